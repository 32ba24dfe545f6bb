"""FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.balancers._base import Balancer, positive
from mtlkit.balancers._registry import register

EPS = 1e-8  # keeps log(L - b) finite when a loss reaches its lower bound
UPDATES = ("same_batch", "next_batch")


@register("famo")
class FAMO(Balancer):
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
        ``logits`` (K,); ``adam_m``, ``adam_v`` (K,) Adam moments; ``adam_t`` () Adam step;
        ``prev_losses`` (K,) losses of the last ``backward``; ``pending`` () whether an
        ``after_step`` is due.
    """

    logits: Tensor
    adam_m: Tensor
    adam_v: Tensor
    adam_t: Tensor
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
        *,
        check_finite: bool = True,
    ) -> None:
        super().__init__(tasks, check_finite=check_finite)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        self.update = update
        self.needs_after_step = update == "same_batch"
        self.lr = positive("lr", lr)
        self.gamma = positive("gamma", gamma, allow_zero=True)
        self.betas = (0.9, 0.999)
        k = self.num_tasks
        self.register_buffer("min_losses", self._task_values(min_losses, "min_losses"))
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_losses", torch.zeros(k))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    def _gap(self, losses: Tensor) -> Tensor:
        return (losses.float() - self.min_losses).clamp_min(0) + EPS

    def _loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
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
        grad = z * (delta - z @ delta)  # softmax Jacobian (symmetric) times delta
        grad.add_(self.logits, alpha=self.gamma)  # Adam's L2 weight decay, as torch.optim.Adam
        b1, b2 = self.betas
        self.adam_t += 1
        t = self.adam_t.float()
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.adam_v / (1 - b2**t)).sqrt_().add_(1e-8)
        self.logits.sub_((self.adam_m / (1 - b1**t)).div_(denom).mul_(self.lr))
        self.pending.fill_(False)

    def extra_repr(self) -> str:
        return f"lr={self.lr}, gamma={self.gamma}, update={self.update!r}"
