"""IMTL-L: learned loss scales that bring every scaled loss to the same value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.balancers._base import LossWeighting
from mtlkit.balancers._registry import register


@register("imtl_l")
class IMTLL(LossWeighting):
    r"""IMTL-L (loss balance of impartial multi-task learning): learn one scale per task so that
    the scaled losses stay equal.

    Proposed in Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task
    Learning* (ICLR 2021, OpenReview IMPnRXEWpvr; there is no arXiv version), Section 3.2. With a
    learnable :math:`s_k` per task, the backpropagated loss is

    .. math::  \sum_k e^{s_k} L_k - s_k,

    whose gradient in :math:`s_k` is :math:`e^{s_k} L_k - 1`: at its stationary point every
    scaled loss :math:`e^{s_k} L_k` equals 1, whatever the scale of the raw losses. The reported
    weight of task k is :math:`e^{s_k}`; the shared parameters and the heads receive the scaled
    gradients (one backward pass, as a plain sum).

    .. note:: The scales :math:`s_k` are parameters of this module (initialised at 0, as the
       paper): give ``balancer.parameters()`` to the optimiser. The paper designs IMTL-L for
       positive losses (for a loss at or below 0 the objective has no minimum in :math:`s_k`).
       IMTL-L is ``imtl`` with ``loss_scale=True`` without the gradient balance of IMTL-G (its
       hybrid, the paper's "IMTL").

    Args:
        tasks: task names.
        **options: ``check_finite`` (see :class:`~mtlkit.balancers.Balancer`).

    State:
        ``log_scales`` (K,), the learned :math:`s_k`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._imtl_l import IMTLL
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> b = IMTLL(["a", "b"])
        >>> step = b.backward([p * 2, p * 0.5])
        >>> step.weights
        {'a': 1.0, 'b': 1.0}
        >>> b.log_scales.grad  # e^s L - 1 at s = 0
        tensor([ 1.0000, -0.5000])
    """

    log_scales: nn.Parameter
    minus_ones: Tensor

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__(tasks, **options)
        self.log_scales = nn.Parameter(torch.zeros(self.num_tasks))
        self.register_buffer("minus_ones", torch.full((self.num_tasks,), -1.0), persistent=False)

    def learned_weights(self, values: Tensor) -> tuple[Tensor, Callable[[], Tensor],
                                                       list[Tensor]]:
        # w_k = e^{s_k}; d/ds_k of (e^{s_k} L_k - s_k) = w_k L_k - 1, from the whole batch's
        # loss values (the objective is linear in the losses). Three operations: this is the
        # whole overhead over a plain sum (the regulariser -sum_k s_k is computed from the
        # weights, and only when read).
        s = self._parameters["log_scales"].detach()  # type: ignore[union-attr]
        minus_ones = self._buffers["minus_ones"]
        weights = torch.exp(s)
        if values.dtype != s.dtype:
            values = values.to(s.dtype)
        grad = torch.addcmul(minus_ones, weights, values)  # type: ignore[arg-type]
        return weights, lambda: minus_ones @ weights.log(), [grad]  # type: ignore[operator]
