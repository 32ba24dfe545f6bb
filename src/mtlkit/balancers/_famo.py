"""FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023)."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._functional import InnerAdam, host_view, host_write
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
      parameters. That is one more no-grad forward pass per step (the trainer runs it;
      1.05-1.10x the step of a plain sum plus that forward, measured beside it on the tiny
      suite of ``mtlkit bench speed``, where a plain Python FAMO with no validation and no
      saved state, ``bench/famo_floor.py``, takes 1.02-1.07x; 1.03-1.08x a plain sum's step
      for ``"next_batch"``).
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
        ``after_step`` is due. All on the host (float64 but ``min_losses``) whatever the device
        of the balancer: the weights are K-sized host maths (one read of the losses per step).

    Example:
        >>> import torch
        >>> from mtlkit.balancers import FAMO
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> b = FAMO(["a", "b"], lr=0.1, gamma=0.0)
        >>> b.backward([p * 1.0, p * 4.0]).weights  # equal logits: w_k proportional to 1 / L_k
        {'a': 0.800000011920929, 'b': 0.20000000298023224}
        >>> b.after_step([torch.tensor(0.5), torch.tensor(3.5)])  # a fell faster: b gains
        >>> b.logits  # Adam's first step: lr times the sign of the gradient
        tensor([-0.1000,  0.1000], dtype=torch.float64)
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
        self.register_buffer("logits", torch.zeros(k, dtype=torch.float64))
        self.adam = InnerAdam(k, lr=self.lr, dtype=torch.float64)
        self.register_buffer("prev_losses", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    def _state(self) -> tuple[memoryview, ...]:
        """Host views of (logits, prev_losses, pending, min_losses) (see ``host_view``)."""
        return (host_view(self, "logits"), host_view(self, "prev_losses"),
                host_view(self, "pending"), host_view(self, "min_losses"))

    # The K-sized maths below is in Python floats, in few passes over few objects: this runs
    # every step, and inside a training step each object or array call it touches costs more
    # than the arithmetic (see LossWeighting).
    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        logits, prev, pending, bounds = self._state()
        low = bounds.tolist()
        if pending[()] and not self.needs_after_step:  # next_batch: these losses are L(t+1)
            x = self._move_logits(values, logits, prev, pending, low)
        else:
            x = logits.tolist()
        host_write(prev, values)
        pending[()] = True
        # w = (z / D) / sum(z / D) with z = softmax(logits): the softmax's sum cancels
        top = max(x)
        ratio = [math.exp(a - top) / (max(v - b, 0.0) + EPS) for a, v, b in zip(x, values, low)]
        total = sum(ratio)
        return [r / total for r in ratio]

    def _after_step(self, values: list[float]) -> None:
        logits, prev, pending, bounds = self._state()
        if not pending[()]:
            raise RuntimeError("famo.after_step() called without a backward() before it")
        self._move_logits(values, logits, prev, pending, bounds.tolist())

    def _move_logits(self, losses: list[float], logits: memoryview, prev: memoryview,
                     pending: memoryview, low: list[float]) -> list[float]:
        """One Adam step of the logits along the drop of the log gaps D = L - b + eps from
        ``prev_losses`` to ``losses``; clears ``pending``; returns the new logits."""
        x = logits.tolist()
        top = max(x)
        exp, log = math.exp, math.log
        e, delta = [], []  # z = e / sum(e); delta: the drop of log D
        for a, p, v, b in zip(x, prev.tolist(), losses, low):
            e.append(exp(a - top))
            delta.append(log((max(p - b, 0.0) + EPS) / (max(v - b, 0.0) + EPS)))
        total = sum(e)
        mean = sum(map(operator.mul, e, delta)) / total
        # softmax Jacobian (symmetric) times delta, plus the L2 weight decay (as torch.optim.Adam
        # adds it to the gradient)
        gamma = self.gamma
        grad = [ek / total * (dk - mean) + gamma * xk for ek, dk, xk in zip(e, delta, x)]
        pending[()] = False
        return self._modules["adam"].step(logits, grad)  # type: ignore[union-attr,return-value]

    def extra_repr(self) -> str:
        return f"lr={self.lr}, gamma={self.gamma}, update={self.update!r}"

