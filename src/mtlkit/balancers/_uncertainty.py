"""Uncertainty weighting (Kendall, Gal & Cipolla 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlkit.balancers._base import LossWeighting
from mtlkit.balancers._registry import register

Kind = Literal["regression", "classification"]
KINDS = ("regression", "classification")


@register("uw")
class UncertaintyWeighting(LossWeighting):
    r"""Homoscedastic uncertainty weighting with a learned log-variance per task.

    Proposed in Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics* (CVPR 2018, arXiv:1705.07115), eqs. (7) and (10).

    The parameter is :math:`s_k = \log \sigma_k^2` (**the log-variance**, not :math:`\log\sigma`,
    a factor-of-two mix-up in several ports). The backpropagated loss is

    .. math::  \sum_k c_k e^{-s_k} L_k + \tfrac12 s_k,
        \qquad c_k = \tfrac12 \text{ (regression)},\ 1 \text{ (classification)},

    so the effective weight reported in ``BalanceStep.weights`` is :math:`c_k e^{-s_k}`, i.e.
    :math:`1/(2\sigma_k^2)` or :math:`1/\sigma_k^2`. The :math:`\tfrac12 s_k = \log\sigma_k` term
    makes the total loss negative once :math:`\sigma_k < 1`: this is expected, not a bug.

    The log-variances are parameters of this module: hand them to the optimiser, e.g.
    ``torch.optim.Adam([*model.parameters(), *balancer.parameters()])``.

    Args:
        tasks: task names.
        kinds: ``"regression"`` or ``"classification"``, one for all tasks or per task
            (default regression, the paper's Gaussian likelihood).
        init_log_var: initial :math:`s_k` (default 0, i.e. :math:`\sigma = 1`).

    State:
        ``log_vars`` (K,) learned :math:`s_k`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers import UncertaintyWeighting
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> b = UncertaintyWeighting(["a", "b"], kinds={"a": "regression", "b": "classification"})
        >>> b.backward([p * 2, p * 3]).weights
        {'a': 0.5, 'b': 1.0}
        >>> b.log_vars.grad  # d/ds (c e^{-s} L + s/2) at s=0: -c L + 1/2
        tensor([-0.5000, -2.5000])
    """

    log_vars: nn.Parameter
    log_scale: Tensor
    halves: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        kinds: Kind | Mapping[str, Kind] = "regression",
        init_log_var: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        per_task = kinds if isinstance(kinds, Mapping) else dict.fromkeys(self.tasks, kinds)
        unknown = [k for k in per_task if k not in self.tasks]
        missing = [t for t in self.tasks if t not in per_task]
        if unknown or missing:
            raise ValueError(f"kinds must cover exactly the tasks; unknown {unknown}, missing {missing}")
        for t, kind in per_task.items():
            if kind not in KINDS:
                raise ValueError(f"kinds[{t!r}] must be one of {KINDS}, got {kind!r}")
        self.kinds = {t: per_task[t] for t in self.tasks}
        init = self._task_values(init_log_var, "init_log_var")
        self.log_vars = nn.Parameter(init)
        # log c_k: c_k = 1/2 for a Gaussian (regression) likelihood, 1 for a softmax one.
        log_scale = [math.log(0.5 if self.kinds[t] == "regression" else 1.0) for t in self.tasks]
        self.register_buffer("log_scale", torch.tensor(log_scale), persistent=False)
        self.register_buffer("halves", torch.full((self.num_tasks,), 0.5), persistent=False)

    def learned_weights(self, values: Tensor) -> tuple[Tensor, Callable[[], Tensor],
                                                       list[Tensor]]:
        # w_k = c_k e^{-s_k}; d/ds_k of (c_k e^{-s_k} L_k + s_k / 2) = 1/2 - w_k L_k, from the
        # whole batch's loss values (the objective is linear in the losses). Four operations:
        # this is the whole overhead over a plain sum (the regulariser sum_k s_k / 2 is
        # computed from the weights, and only when read).
        s = self._parameters["log_vars"].detach()  # type: ignore[union-attr]
        log_scale, halves = self._buffers["log_scale"], self._buffers["halves"]
        weights = torch.exp(log_scale - s)  # type: ignore[operator]
        if values.dtype != s.dtype:
            values = values.to(s.dtype)
        grad = torch.addcmul(halves, weights, values, value=-1)  # type: ignore[arg-type]
        return weights, lambda: halves @ (log_scale - weights.log()), [grad]  # type: ignore[operator]

    def extra_repr(self) -> str:
        return f"kinds={self.kinds}"
