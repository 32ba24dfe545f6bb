"""Weights that follow the training dynamics: DWA, DTP, LBTW and random weighting."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, frozen, positive
from mtlkit.balancers._functional import host_add, host_view, host_write, softmax
from mtlkit.balancers._registry import register
from mtlkit.balancers._scaling import LOSS_FLOOR
from mtlkit.engine._dist import all_mean_host


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
        self._refresh()

    #: The current weights (read-only), derived from ``history``: recomputed when it changes
    #: or is loaded. Not state.
    _current: np.ndarray

    def _refresh(self) -> None:
        k = self.num_tasks
        if int(self.epochs_seen) >= 2:
            history = np.asarray(host_view(self, "history"))
            z = history[1] / np.maximum(history[0], LOSS_FLOOR) / self.temperature
            e = np.exp(z - z.max())
            weights = k * e / e.sum()
        else:
            weights = np.ones(k)
        self.__dict__["_current"] = frozen(weights)

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> np.ndarray:
        out = self._current
        if self.per_batch:
            history = np.asarray(host_view(self, "history"))
            history[0] = history[1]
            history[1] = values
            self.epochs_seen += 1
            self._refresh()
        else:  # the hot path: two in-place additions on the host
            host_add(host_view(self, "epoch_sum"), values)
            host_view(self, "epoch_count")[()] += 1
        return out

    def new_epoch(self) -> None:
        if self.per_batch or int(self.epoch_count) == 0:
            return
        self.history[0] = self.history[1]
        self.history[1] = self.epoch_sum / self.epoch_count
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        self.epochs_seen += 1
        self._refresh()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

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
    A task with no KPI of its own (``None``; :meth:`mtlkit.tasks.Task.kpi` gives None for
    regression-like tasks) uses :math:`\kappa_k = \exp(-L_k / L_k^{first})`, clamped to
    [1e-3, 1]: 1/e at its first step, rising as the loss falls.

    Args:
        tasks: task names.
        gamma: focusing parameter :math:`\gamma_k \ge 0`, one value or per task (default 1).
        alpha: weight of the newest KPI in the moving average, in (0, 1] (default 0.1).

    .. note:: The paper tunes :math:`\gamma` and :math:`\alpha` per experiment; the defaults here
       are ours. A KPI of exactly 1 gives weight 0 (the task is mastered).

    State:
        ``kpi_avg`` (K,) the moving average :math:`\bar\kappa`; ``kpi_seen`` () whether set;
        ``first_loss`` (K,), ``first_seen`` (K,) the first loss of each task without a KPI.
    """

    context_keys = ("kpi",)
    kpi_avg: Tensor
    kpi_seen: Tensor
    first_loss: Tensor
    first_seen: Tensor
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
        self._gammas: list[float] = gammas.tolist()
        self._unit_gammas = all(g == 1.0 for g in self._gammas)
        self.register_buffer("kpi_avg", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("kpi_seen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("first_loss", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("first_seen", torch.zeros(self.num_tasks, dtype=torch.bool))
        self._kpi_given: list[float | None] = []

    def _validate_context(self, context: Mapping[str, Any]) -> None:
        # The common case first (a dict of floats in (0, 1] or None for exactly the tasks):
        # this runs every step; anything else takes the checks below, which name the error.
        kpi = context.get("kpi")
        if type(kpi) is dict and len(kpi) == len(self.tasks):
            given = [kpi.get(t, False) for t in self.tasks]
            for v in given:
                if not (v is None or (type(v) is float and 0.0 < v <= 1.0)):
                    break
            else:
                self.__dict__["_kpi_given"] = given  # (cheaper than Module.__setattr__)
                return
        if "kpi" not in context:
            raise ValueError("dtp needs kpi={task: value in (0, 1] or None} in every backward() "
                             "call")
        kpi = context["kpi"]
        if not isinstance(kpi, Mapping):
            raise TypeError(f"kpi must be a mapping task -> value in (0, 1], got {type(kpi)}")
        unknown = [k for k in kpi if k not in self.tasks]
        missing = [t for t in self.tasks if t not in kpi]
        if unknown or missing:
            raise ValueError(f"kpi must give a value for exactly the tasks {list(self.tasks)}; "
                             f"unknown {unknown}, missing {missing}")
        given: list[float | None] = []
        for t in self.tasks:
            v = kpi[t]
            if v is not None:
                v = float(v)
                if not 0 < v <= 1:
                    raise ValueError(f"kpi of task {t!r} must be in (0, 1], got {v}")
            given.append(v)
        self._kpi_given = given  # read by loss_weights in this same step

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        # K-sized maths in Python floats (see mtlkit.balancers._functional.softmax)
        given = self._kpi_given
        kpi = [1.0 if v is None else v for v in given]
        if self._world > 1:  # (read by backward() this step)
            kpi = all_mean_host(np.array(kpi)).tolist()  # the ranks' KPIs, as one batch's
        if None in given:  # a task without a KPI of its own: exp(-L / L_first)
            first, first_seen = host_view(self, "first_loss"), host_view(self, "first_seen")
            for k, (v, loss) in enumerate(zip(given, values)):
                if v is None:
                    loss = max(loss, LOSS_FLOOR)
                    if not first_seen[k]:
                        first[k], first_seen[k] = loss, True
                    kpi[k] = min(max(math.exp(-loss / first[k]), 1e-3), 1.0)
        average = host_view(self, "kpi_avg")
        seen = host_view(self, "kpi_seen")
        if seen[()]:
            a = self.alpha
            b = 1 - a
            kpi = [a * k + b * m for k, m in zip(kpi, average.tolist())]
        else:
            seen[()] = True
        host_write(average, kpi)
        log = math.log
        if self._unit_gammas:  # the default: (1 - k) ** 1, without the power
            return [(k - 1) * log(k) for k in kpi]
        return [-((1 - k) ** g) * log(k) for k, g in zip(kpi, self._gammas)]

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

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        initial, need = host_view(self, "epoch_initial"), host_view(self, "need_initial")
        if need[()]:
            host_write(initial, values)
            need[()] = False
        alpha = self.alpha
        return [max(v / max(i, LOSS_FLOOR), 0.0) ** alpha
                for v, i in zip(values, initial.tolist())]

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

    reads_values = False

    def loss_weights(self, values: None, context: Mapping[str, Any]) -> list[float]:
        step = host_view(self, "step")[()]
        return softmax(self._host_draws(step, lambda gen, n: torch.randn(
            n, self.num_tasks, generator=gen, dtype=torch.float64)))

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
