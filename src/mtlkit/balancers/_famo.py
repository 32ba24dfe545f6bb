"""FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._functional import InnerAdam
from mtlkit.balancers._registry import register

EPS = 1e-8  # keeps log(L - b) finite when a loss reaches its lower bound
UPDATES = ("same_batch", "next_batch")


@register("famo")
class FAMO(LossWeighting):
    r"""Fast Adaptive Multitask Optimization: balance the *rates* at which the losses fall, in
    O(1) extra space and time per step.

    Proposed in Liu, Feng, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*
    (NeurIPS 2023, arXiv:2306.03792), Algorithm 1. With logits :math:`\xi`, :math:`z =
    \mathrm{softmax}(\xi)` and :math:`D_k = L_k - b_k + \epsilon`, the update is the gradient of
    :math:`\sum_k z_k \log D_k / c` with :math:`c = \sum_k z_k / D_k`, i.e. effective weights

    .. math::  w_k = \frac{z_k / D_k}{\sum_i z_i / D_i}, \qquad \sum_k w_k = 1.

    The logits move along :math:`\delta = \nabla_\xi z^\top [\log D(t) - \log D(t+1)]`, the
    observed drop of the log losses over one step, with Adam (learning rate ``lr``, weight decay
    ``gamma``). Where :math:`L(t+1)` comes from is ``update``:

    * ``"same_batch"`` (default; the paper's Algorithm 1 and its official code): after the
      optimiser step, :meth:`after_step` takes the losses of the *same* batch at the new
      parameters. That is one more no-grad forward pass per step (the trainer runs it; about
      1.4x a plain sum's step time in ``mtlkit bench speed``).
    * ``"next_batch"``: no extra forward. At the next :meth:`backward`, the new batch's losses
      (also at :math:`\theta_{t+1}`, but on other data) stand in for :math:`L(t+1)`, and the
      logits move before that step's weights are computed. :math:`\delta` then also holds the
      batch-to-batch variation of the losses; the weights of step t+1 are those ``same_batch``
      gives when the two batches' losses agree (tested).

    .. note:: We backpropagate :math:`\sum_k w_k L_k` with :math:`w` constant; it has the same
       gradient as the paper's :math:`\sum_k z_k \log D_k / c`, and stays positive (the log of a
       loss below 1 is negative, which confused users of the original). The inner Adam moments
       are buffers of this module, so they are saved with ``state_dict()``.

    Args:
        tasks: task names.
        lr: learning rate :math:`\beta` of the logits (official code: 0.025).
        gamma: weight decay :math:`\gamma` of the logits (official code: 0.01).
        min_losses: lower bounds :math:`b_k` of the losses (default 0).
        update: ``"same_batch"`` or ``"next_batch"`` (see above).

    State:
        ``logits`` (K,); ``adam.m``, ``adam.v`` (K,) Adam moments, ``adam.t`` () its step
        (:class:`~mtlkit.balancers._functional.InnerAdam`);
        ``prev_losses`` (K,) losses of the last ``backward``; ``pending`` () whether an
        ``after_step`` is due.
    """

    logits: Tensor
    prev_losses: Tensor
    pending: Tensor
    min_losses: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        lr: float = 0.025,
        gamma: float = 0.01,
        min_losses: float | Mapping[str, float] = 0.0,
        update: Literal["same_batch", "next_batch"] = "same_batch",
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        self.update = update
        self.needs_after_step = update == "same_batch"
        self.lr = positive("lr", lr)
        self.gamma = positive("gamma", gamma, allow_zero=True)
        k = self.num_tasks
        self.register_buffer("min_losses", self._task_values(min_losses, "min_losses"))
        self.register_buffer("logits", torch.zeros(k))
        self.adam = InnerAdam(k, lr=self.lr, weight_decay=self.gamma)
        self.register_buffer("prev_losses", torch.zeros(k))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    def _gap(self, losses: Tensor) -> Tensor:
        return (losses.float() - self.min_losses).clamp_min(0) + EPS

    def loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
        gap = self._gap(losses)
        if not self.needs_after_step and bool(self.pending):
            self._move_logits(gap)  # next_batch: these losses are L(t+1)
        ratio = torch.softmax(self.logits, dim=0) / gap
        self.prev_losses.copy_(losses)
        self.pending.fill_(True)
        return (ratio / ratio.sum()).to(losses.dtype)

    def _after_step(self, losses: Tensor) -> None:
        if not bool(self.pending):
            raise RuntimeError("famo.after_step() called without a backward() before it")
        self._move_logits(self._gap(losses))

    def _move_logits(self, gap: Tensor) -> None:
        """One Adam step of the logits from the drop between ``prev_losses`` and the losses
        whose gap to the bounds is ``gap`` (few, in-place operations: this runs every step)."""
        delta = torch.log(self._gap(self.prev_losses) / gap)
        z = torch.softmax(self.logits, dim=0)
        # softmax Jacobian (symmetric) times delta; Adam's L2 weight decay as torch.optim.Adam
        self.adam.step(self.logits, z * (delta - z @ delta))
        self.pending.fill_(False)

    def extra_repr(self) -> str:
        return f"lr={self.lr}, gamma={self.gamma}, update={self.update!r}"
