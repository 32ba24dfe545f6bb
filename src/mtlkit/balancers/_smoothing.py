"""CR-MOGM: a moving average of another Gram weighting's weights (a wrapper)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import GramianWeighting
from mtlkit.balancers._registry import create, get, register


def smoothed_weights(previous: Tensor, current: Tensor, alpha: float, first: bool) -> Tensor:
    r""":math:`\lambda_t = \alpha \lambda_{t-1} + (1 - \alpha) \hat\lambda_t`, and
    :math:`\lambda_1 = \hat\lambda_1` on the first step."""
    return current if first else alpha * previous + (1.0 - alpha) * current


@register("cr_mogm")
class CRMOGM(GramianWeighting):
    r"""CR-MOGM: smooth the weights of any Gram weighting (MGDA, PCGrad, CAGrad, ...) with an
    exponential moving average across steps, so that stochastic gradient manipulation converges.

    Proposed in Zhou, Zhang, Jiang, Zhong, Gu & Zhu, *On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond* (NeurIPS 2022; we know of no arXiv
    version), Section 4. With :math:`\hat\lambda_t` the weights the wrapped method computes from this step's Gram
    matrix,

    .. math::  \lambda_t = \alpha\, \lambda_{t-1} + (1 - \alpha)\, \hat\lambda_t, \qquad
        d = \sum_k \lambda_{t,k}\, g_k,

    with :math:`\lambda_1 = \hat\lambda_1`. The paper shows that weights taken from the
    instantaneous stochastic gradients alone may fail to converge to a Pareto-stationary point,
    and that the average fixes it.

    .. note:: The paper's Corollary 1 lets :math:`\alpha_t` grow towards 1 as the learning rate
       decays; here :math:`\alpha` is a constant (set ``balancer.alpha`` between steps to follow a
       schedule), default 0.9 as TorchJD. :math:`\lambda_1 = \hat\lambda_1` follows TorchJD.
       Only methods whose update is a combination of the task gradients with weights from the
       Gram matrix can be wrapped (a :class:`~mtlkit.balancers.GramianWeighting`); their own state is kept as a child
       module (``inner``) and saved with this one.

    Args:
        tasks: task names.
        method: registry name of the wrapped Gram weighting (default ``"mgda"``).
        alpha: averaging factor :math:`\alpha \in [0, 1]` (default 0.9). 0 is the wrapped
            method itself.
        method_options: hyperparameters of the wrapped method.
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    State:
        ``smoothed`` (K,), the averaged weights :math:`\lambda_{t-1}`; the wrapped method's state
        under ``inner.``.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._smoothing import CRMOGM
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> b = CRMOGM(["a", "b"], method="mgda", alpha=0.5,
        ...            method_options={"normalization": "none"})
        >>> for g2 in (torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])):
        ...     step = b.backward([p @ torch.tensor([1.0, 0.0]), p @ g2], shared=[p])
        >>> step.weights  # MGDA gives (0.5, 0.5), then (0.9, 0.1): averaged
        {'a': 0.699999988079071, 'b': 0.30000001192092896}
    """

    smoothed: Tensor

    def __init__(self, tasks: Sequence[str], *, method: str = "mgda", alpha: float = 0.9,
                 method_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__(tasks, **options)
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        wrapped = get(method).requires
        if wrapped != "gramian":
            raise ValueError(f"cr_mogm wraps a Gram weighting (requires 'gramian'); "
                             f"{method!r} requires {wrapped!r}")
        inner = create(method, self.tasks, **dict(method_options or {}))
        self.method = method
        self.inner = inner
        self.register_buffer("smoothed", torch.zeros(self.num_tasks))

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        current = self.inner.gramian_weights(gramian, losses).to(self.smoothed.dtype)
        self.inner.step += 1  # the wrapped method's own counter (seeds, warnings)
        out = smoothed_weights(self.smoothed, current, self.alpha, first=int(self.step) == 0)
        self.smoothed.copy_(out)
        return out.to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, alpha={self.alpha}, {super().extra_repr()}"
