"""Weights that follow the training dynamics: DWA, DTP, LBTW and random weighting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._registry import register
from mtlkit.balancers._scaling import LOSS_FLOOR
from mtlkit.engine._dist import all_mean


@register("dwa")
class DynamicWeightAverage(LossWeighting):
    r"""Dynamic Weight Average: weight each task by how slowly its loss is falling.

    Proposed in Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*
    (CVPR 2019, arXiv:1803.10704), eq. (7):

    .. math::  w_k(t) = K \frac{\exp(r_k(t-1)/T)}{\sum_i \exp(r_i(t-1)/T)},
        \qquad r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)},

    where :math:`\bar L_k(e)` is the mean loss of task k over epoch e, and :math:`w_k = 1` in the
    first two epochs. Call :meth:`new_epoch` at each epoch boundary.

    .. note:: The paper says "average loss in each epoch"; the official code uses per-batch
       losses for some experiments. Epoch averages are the default (the paper's definition);
       ``per_batch=True`` uses the losses of the last two steps instead.

    Args:
        tasks: task names.
        temperature: T > 0 (paper: 2). Larger T gives more even weights.
        per_batch: use the previous two steps' losses instead of epoch means.

    State:
        ``epoch_sum`` (K,) and ``epoch_count`` () of the running epoch; ``history`` (2, K) the
        last two epoch means (row 0 the older); ``epochs_seen`` () how many epochs completed.
    """

    epoch_sum: Tensor
    epoch_count: Tensor
    history: Tensor
    epochs_seen: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        temperature: float = 2.0,
        per_batch: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.temperature = positive("temperature", temperature)
        self.per_batch = bool(per_batch)
        k = self.num_tasks
        self.register_buffer("epoch_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.ones(2, k, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
        ratio = self.history[1] / self.history[0].clamp_min(LOSS_FLOOR)
        weights = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        warm = self.epochs_seen >= 2
        out = torch.where(warm, weights, torch.ones_like(weights)).to(losses.dtype)
        if self.per_batch:
            self.history[0] = self.history[1]
            self.history[1] = losses.double()
            self.epochs_seen += 1
        else:
            self.epoch_sum += losses.double()
            self.epoch_count += 1
        return out

    def new_epoch(self) -> None:
        if self.per_batch or int(self.epoch_count) == 0:
            return
        self.history[0] = self.history[1]
        self.history[1] = self.epoch_sum / self.epoch_count
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        self.epochs_seen += 1

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, per_batch={self.per_batch}"


@register("dtp")
class DynamicTaskPrioritization(LossWeighting):
    r"""Dynamic Task Prioritization: focus on the tasks whose key performance indicator is low.

    Proposed in Guo, Haque, Huang, Yeung & Fei-Fei, *Dynamic Task Prioritization for Multitask
    Learning* (ECCV 2018), section 3.2 (task-level prioritisation):

    .. math::  w_k = -(1-\bar\kappa_k)^{\gamma_k} \log \bar\kappa_k,
        \qquad \bar\kappa_k(t) = \alpha\,\kappa_k(t) + (1-\alpha)\,\bar\kappa_k(t-1),

    with :math:`\kappa_k \in (0, 1]` a KPI of task k (e.g. its batch accuracy), passed each step
    as ``backward(losses, kpi={task: value})``. The first KPI initialises :math:`\bar\kappa`.

    Args:
        tasks: task names.
        gamma: focusing parameter :math:`\gamma_k \ge 0`, one value or per task (default 1).
        alpha: weight of the newest KPI in the moving average, in (0, 1] (default 0.1).

    .. note:: The paper tunes :math:`\gamma` and :math:`\alpha` per experiment; the defaults here
       are ours. A KPI of exactly 1 gives weight 0 (the task is mastered).

    State:
        ``kpi_avg`` (K,) the moving average :math:`\bar\kappa`; ``kpi_seen`` () whether set.
    """

    context_keys = ("kpi",)
    kpi_avg: Tensor
    kpi_seen: Tensor
    gamma: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        gamma: float | Mapping[str, float] = 1.0,
        alpha: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        gammas = self._task_values(gamma, "gamma")
        for t, g in zip(self.tasks, gammas.tolist()):
            positive(f"gamma[{t!r}]", g, allow_zero=True)
        alpha = float(alpha)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.register_buffer("gamma", gammas, persistent=False)
        self.register_buffer("kpi_avg", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("kpi_seen", torch.zeros((), dtype=torch.bool))

    def _validate_context(self, context: Mapping[str, Any]) -> None:
        if "kpi" not in context:
            raise ValueError("dtp needs kpi={task: value in (0, 1]} in every backward() call")
        kpi = context["kpi"]
        if not isinstance(kpi, Mapping):
            raise TypeError(f"kpi must be a mapping task -> value in (0, 1], got {type(kpi)}")
        values = self._task_values({t: float(v) for t, v in kpi.items()}, "kpi")
        for t, v in zip(self.tasks, values.tolist()):
            if not 0 < v <= 1:
                raise ValueError(f"kpi of task {t!r} must be in (0, 1], got {v}")

    def loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
        kpi = torch.tensor([float(context["kpi"][t]) for t in self.tasks], dtype=torch.float64)
        kpi = all_mean(kpi.to(self.kpi_avg.device))  # the ranks' KPIs, as one batch's
        blended = self.alpha * kpi + (1 - self.alpha) * self.kpi_avg
        self.kpi_avg.copy_(torch.where(self.kpi_seen, blended, kpi))
        self.kpi_seen.fill_(True)
        k = self.kpi_avg
        return (-((1 - k) ** self.gamma.double()) * torch.log(k)).to(losses.dtype)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma.tolist()}, alpha={self.alpha}"


@register("lbtw")
class LossBalancedTaskWeighting(LossWeighting):
    r"""Loss-Balanced Task Weighting: down-weight tasks that have already learned a lot.

    Proposed in Liu, Liang & Gitter, *Loss-Balanced Task Weighting to Reduce Negative Transfer
    in Multi-Task Learning* (AAAI 2019 student abstract, doi:10.1609/aaai.v33i01.33019977):

    .. math::  w_k(t) = \left(\frac{L_k(t)}{L_k(0)}\right)^{\alpha},

    where :math:`L_k(0)` is the loss of the first batch of the current epoch. Call
    :meth:`new_epoch` at each epoch boundary.

    Args:
        tasks: task names.
        alpha: exponent :math:`\alpha \ge 0` (paper: 0.5); 0 gives equal weights.

    State:
        ``epoch_initial`` (K,) the first losses of the epoch; ``need_initial`` () whether the
        next step starts an epoch.
    """

    epoch_initial: Tensor
    need_initial: Tensor

    def __init__(self, tasks: Sequence[str], alpha: float = 0.5, **options: Any) -> None:
        super().__init__(tasks, **options)
        self.alpha = positive("alpha", alpha, allow_zero=True)
        self.register_buffer("epoch_initial", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("need_initial", torch.ones((), dtype=torch.bool))

    def loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
        self.epoch_initial.copy_(torch.where(self.need_initial, losses.double(), self.epoch_initial))
        self.need_initial.fill_(False)
        ratio = losses.double() / self.epoch_initial.clamp_min(LOSS_FLOOR)
        return ratio.clamp_min(0).pow(self.alpha).to(losses.dtype)

    def new_epoch(self) -> None:
        self.need_initial.fill_(True)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


@register("rlw")
class RandomLossWeighting(LossWeighting):
    r"""Random Loss Weighting: fresh random weights every step.

    Proposed in Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning* (TMLR 2022, arXiv:2111.10603): :math:`w = \mathrm{softmax}(z)`,
    :math:`z \sim \mathcal N(0, I_K)`, so :math:`\sum_k w_k = 1`.

    The draw at step t depends only on ``(seed, t)``, so a resumed run draws the same weights as
    an uninterrupted one, with no generator state to save.

    Args:
        tasks: task names.
        seed: seed of the weight sequence.
    """

    def __init__(self, tasks: Sequence[str], seed: int = 0, **options: Any) -> None:
        super().__init__(tasks, **options)
        self.seed = int(seed)

    def loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
        z = torch.randn(self.num_tasks, generator=self._rng(), dtype=torch.float64)
        return torch.softmax(z, dim=0).to(losses)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
