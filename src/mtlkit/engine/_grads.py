"""Per-task gradients: the one place that runs the backward passes of gradient-based balancers.

Two places to take the task gradients (``grad_on``):

* ``"parameters"`` (exact): the Jacobian J (K x P) of the task losses with respect to the shared
  parameters. Its Gram matrix ``G = J J^T`` feeds the weighting; the update ``J^T w`` is then
  written into ``.grad`` directly, with no further backward pass.
* ``"features"`` (cheap, as MGDA-UB in Sener & Koltun 2018): the per-task gradients of the last
  shared representation z. Their Gram matrix feeds the weighting, and ``sum_k w_k dL_k/dz`` is
  pushed through the trunk with one ordinary backward pass.

How the K trunk backward passes run (``strategy``, parameters mode):

* ``"batched"``: one vectorised backward (``torch.autograd.grad(..., is_grads_batched=True)``);
  ``chunk_size`` bounds how many tasks go through at once (memory ~ chunk x activations).
* ``"loop"``: K ordinary passes, the least memory.
* ``"auto"``: batched in chunks of at most 16 tasks.

Task-specific parameters (leaves reached from the losses that are not shared, and, when features
are given, not behind them) receive the plain gradient of their own task's loss. They are found
by walking the autograd graph of the losses, so the caller never lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

GradOn = Literal["parameters", "features"]
Strategy = Literal["auto", "batched", "loop"]
GRAD_ON: tuple[str, ...] = ("parameters", "features")
STRATEGIES: tuple[str, ...] = ("auto", "batched", "loop")
AUTO_CHUNK = 16


@dataclass
class TaskGradients:
    """Per-task gradients of one step, and how to write a combination of them.

    Attributes:
        gramian: K x K Gram matrix of the task gradients (in the chosen space).
        blocks: per-task gradient blocks, each (K, *shape) (one per shared parameter, or the
            single feature tensor in features mode).
    """

    gramian: Tensor
    blocks: list[Tensor]
    shared: list[Tensor]
    features: Tensor | None
    grad_on: GradOn

    def jacobian_matrix(self) -> Tensor:
        """The K x P matrix of task gradients (materialised on demand)."""
        k = self.gramian.shape[0]
        return torch.cat([b.reshape(k, -1) for b in self.blocks], dim=1)

    def apply_weights(self, weights: Tensor) -> None:
        """Accumulate ``sum_k w_k g_k`` into the shared parameters' ``.grad``."""
        combined = [torch.tensordot(weights.to(b.dtype), b, dims=1) for b in self.blocks]
        self._write(combined)

    def apply_vector(self, vector: Tensor) -> None:
        """Accumulate a combined gradient given as a flat vector of the task-gradient space."""
        out, offset = [], 0
        for b in self.blocks:
            n = b[0].numel()
            out.append(vector[offset : offset + n].reshape(b.shape[1:]).to(b.dtype))
            offset += n
        self._write(out)

    def _write(self, combined: list[Tensor]) -> None:
        if self.grad_on == "features":
            assert self.features is not None
            torch.autograd.backward(self.features, combined[0], inputs=self.shared)
            return
        for p, g in zip(self.shared, combined):
            _accumulate(p, g)


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    features: Tensor | None = None,
    *,
    grad_on: GradOn = "parameters",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    need_jacobian: bool = False,
) -> TaskGradients:
    """Compute per-task gradients and give the task-specific parameters their own gradients.

    Args:
        losses: K scalar losses.
        shared: the shared parameters.
        features: the last shared representation (needed for ``grad_on="features"``; in
            parameters mode it lets the engine split the pass into heads and trunk).
        grad_on: ``"parameters"`` or ``"features"``.
        strategy: ``"auto"``, ``"batched"`` or ``"loop"`` (parameters mode).
        chunk_size: at most this many tasks per batched backward.
        need_jacobian: the caller will read :meth:`TaskGradients.jacobian_matrix`.

    Returns:
        A :class:`TaskGradients`; task-specific ``.grad`` has already been accumulated.
    """
    if grad_on not in GRAD_ON:
        raise ValueError(f"grad_on must be one of {GRAD_ON}, got {grad_on!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if grad_on == "features" and features is None:
        raise ValueError("grad_on='features' needs the features tensor")
    if features is not None and not features.requires_grad:
        raise ValueError("features does not require grad: it is not connected to the losses")
    if strategy == "auto":
        strategy, chunk_size = "batched", chunk_size or AUTO_CHUNK
    k = len(losses)
    shared = list(shared)
    shared_ids = {id(p) for p in shared}
    if features is not None and id(features) in shared_ids:
        raise ValueError("features must be the shared representation, not a shared parameter")
    heads = _task_leaves(losses, shared_ids, features)

    if features is not None:
        # Heads pass: per task, dL_k/dz and the task's own head gradients. A loop touches only
        # task k's head each time, so it costs one backward through all heads in total.
        dz = []
        for loss in losses:
            out = torch.autograd.grad(
                loss, [features, *heads], retain_graph=True, allow_unused=True
            )
            dz.append(out[0] if out[0] is not None else torch.zeros_like(features))
            for p, g in zip(heads, out[1:]):
                if g is not None:
                    _accumulate(p, g)
        dz_stack = torch.stack(dz)
        if grad_on == "features":
            flat = dz_stack.reshape(k, -1)
            return TaskGradients(_gram(flat), [dz_stack], shared, features, grad_on)
        blocks = _batched_or_loop(
            features, shared, dz_stack, strategy, chunk_size, outputs_are_losses=False
        )
    else:
        blocks = _batched_or_loop(
            torch.stack([loss.reshape(()) for loss in losses]),
            [*shared, *heads],
            None,
            strategy,
            chunk_size,
            outputs_are_losses=True,
        )
        for p, g in zip(heads, blocks[len(shared) :]):
            _accumulate(p, g.sum(0))
        blocks = blocks[: len(shared)]
    gram = sum((_gram(b.reshape(k, -1)) for b in blocks), torch.zeros(k, k, device=blocks[0].device))
    return TaskGradients(gram, blocks, shared, None, grad_on)


def _batched_or_loop(
    outputs: Tensor,
    inputs: list[Tensor],
    grad_rows: Tensor | None,
    strategy: str,
    chunk_size: int | None,
    *,
    outputs_are_losses: bool,
) -> list[Tensor]:
    """Rows of the Jacobian of ``outputs`` w.r.t. ``inputs``: one row per task.

    When ``outputs_are_losses`` the rows are the unit vectors (task k's loss alone); otherwise
    ``grad_rows[k]`` is the gradient to push back from ``outputs`` (dL_k/dz).
    """
    if outputs_are_losses:
        k = outputs.shape[0]
        rows = torch.eye(k, dtype=outputs.dtype, device=outputs.device)
    else:
        assert grad_rows is not None
        k = grad_rows.shape[0]
        rows = grad_rows
    step = 1 if strategy == "loop" else (chunk_size or k)
    parts: list[list[Tensor]] = []
    for start in range(0, k, step):
        chunk = rows[start : start + step]
        last = start + step >= k
        if strategy == "loop":
            out = torch.autograd.grad(
                outputs, inputs, chunk[0], retain_graph=not last,
                allow_unused=True,
            )
            out = tuple(None if g is None else g.unsqueeze(0) for g in out)
        else:
            out = torch.autograd.grad(
                outputs, inputs, chunk, retain_graph=not last,
                allow_unused=True, is_grads_batched=True,
            )
        parts.append(
            [
                torch.zeros((len(chunk), *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for p, g in zip(inputs, out)
            ]
        )
    if len(parts) == 1:
        return parts[0]
    return [torch.cat(col, dim=0) for col in zip(*parts)]


def _gram(flat: Tensor) -> Tensor:
    # Accumulate in float32 at least: bf16 Gram matrices lose the small conflicts that matter.
    f = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    return f @ f.T


def _accumulate(p: Tensor, g: Tensor) -> None:
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad.add_(g)


def _task_leaves(
    losses: Sequence[Tensor], exclude: set[int], features: Tensor | None
) -> list[Tensor]:
    """Leaves that require grad, reached from the losses without passing through ``features``
    and not in ``exclude``: the task-specific parameters. Order is deterministic."""
    stop = features.grad_fn if features is not None else None
    seen: set[int] = set()
    found: dict[int, Tensor] = {}
    stack = [loss.grad_fn for loss in reversed(losses) if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or node is stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:  # an AccumulateGrad node: a leaf parameter
            if id(var) not in exclude and var is not features:
                found.setdefault(id(var), var)
            continue
        stack.extend(nxt for nxt, _ in reversed(node.next_functions) if nxt is not None)
    return list(found.values())
