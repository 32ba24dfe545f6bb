"""Per-task gradients of FSDP-sharded shared parameters (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 the shared parameters the optimiser holds are DTensors, each rank's shard of the
flattened-by-rows parameter; the forward pass runs on all-gathered copies, and FSDP's own
post-backward hooks reduce-scatter the gradients into the shards (averaged over the ranks). A
``torch.autograd.grad`` call never reaches the shards, so the engine takes the task gradients
with K ordinary backward passes (the graph kept for all but the last), letting FSDP do its
reduce-scatter each time, and moves each shard's gradient aside before the next pass.

Each rank then holds its shard of every task's whole-batch gradient (1/ranks of the Jacobian).
The Gram matrix ``G = J J^T`` is the sum over ranks of the shards' own Gram matrices: one
all-reduce of the (blocks x K x K) matrices, the cheapest synchronisation there is. The weights,
computed from G, are the same on every rank, and each rank writes ``sum_k w_k g_k`` into its
shards' ``.grad`` (a DTensor of the parameter's placement). The task-specific parameters (the
heads) receive the plain gradient of their own task's loss from those same backward passes, as
FSDP writes it.

What is not supported (``NotImplementedError``): ``grad_on="features"``, methods that read the
task gradients themselves (a Jacobian aggregator: the full rows are on no rank), and shards of
a mesh other than one dimension over all the processes (HSDP, tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mtlkit.engine._grads import TaskGradients, _gram, graph_has

__all__ = ["is_sharded", "sharded_task_gradients"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(shared: Sequence[Tensor]) -> bool:
    """Whether any of the shared parameters is a DTensor (FSDP2-sharded).

    Example:
        >>> import torch
        >>> is_sharded([torch.nn.Parameter(torch.zeros(2))])
        False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in shared)


def uses_fsdp(losses: Sequence[Tensor]) -> bool:
    """Whether the autograd graph behind ``losses`` passes an FSDP2 module boundary (its
    ``RegisterPostBackwardFunction``, applied to a module's inputs that require grad)."""
    return graph_has(losses,
                     lambda node: type(node).__name__ == "RegisterPostBackwardFunctionBackward")


class ShardedTaskGradients(TaskGradients):
    """:class:`TaskGradients` whose blocks are this rank's shards (K, *local shape) of the task
    gradients of DTensor parameters; the Gram matrices are already summed over the ranks."""

    def jacobian_matrix(self) -> Tensor:
        raise NotImplementedError(
            "under FSDP each rank holds only its shards of the task gradients, so a method that "
            "reads the whole K x P Jacobian cannot run; use a Gram-based method (mgda, upgrad, "
            "cagrad, ...) or a loss weighting"
        )

    def apply_vector(self, vector: Tensor) -> None:
        self.jacobian_matrix()

    def _write(self, combined: list[Tensor], owned: bool = False) -> None:
        dtensor = _dtensor_type()
        assert dtensor is not None
        for p, local in zip(self.shared, combined):
            g = dtensor.from_local(local.detach().to(p.dtype), p.device_mesh, p.placements,
                                   run_check=False, shape=p.shape, stride=p.stride())
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)


def sharded_task_gradients(
    losses: Sequence[Tensor],
    shared: list[Tensor],
    features: Tensor | None,
    *,
    grad_on: str,
    strategy: str,
    retain_graph: bool = False,
) -> TaskGradients:
    """The FSDP path of :func:`mtlkit.engine.task_gradients` (see the module docstring): K
    ordinary backward passes, the shards' Gram matrices summed over the ranks."""
    dtensor = _dtensor_type()
    assert dtensor is not None
    if grad_on != "parameters":
        raise NotImplementedError(
            "grad_on='features' is not supported with FSDP-sharded shared parameters (the "
            "heads' gradients at the features bypass FSDP's hooks); use grad_on='parameters'"
        )
    if strategy not in ("auto", "loop"):
        raise ValueError(
            f"strategy={strategy!r} cannot run with FSDP-sharded shared parameters: the task "
            "gradients are taken by K ordinary backward passes (FSDP reduce-scatters each); "
            "use strategy='auto' or 'loop'"
        )
    plain = [i for i, p in enumerate(shared) if not isinstance(p, dtensor)]
    if plain:
        raise ValueError(
            f"shared mixes FSDP-sharded (DTensor) and plain parameters (position {plain[0]}, "
            f"shape {tuple(shared[plain[0]].shape)}): pass the sharded parameters only "
            "(fully_shard every module that holds a shared parameter)"
        )
    mesh = shared[0].device_mesh
    for i, p in enumerate(shared):
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(pl.is_shard() for pl in
                                                              p.placements):
            raise NotImplementedError(
                f"shared parameter {i} (shape {tuple(p.shape)}) is placed as {p.placements} on "
                f"{p.device_mesh}: only FSDP shards on one 1-D mesh are supported (not HSDP or "
                "tensor parallelism)"
            )
    group = mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise NotImplementedError(
            f"the shared parameters are sharded over {mesh.size()} of {dist.get_world_size()} "
            "processes; the losses are averaged over all of them, so the mesh must span them all"
        )
    k = len(losses)
    # Gradients already in the shards (accumulation over micro-batches) are put aside, and
    # restored before the update is added.
    saved = [p.grad for p in shared]
    for p in shared:
        p.grad = None
    blocks = [torch.zeros((k, *p.to_local().shape), dtype=p.dtype, device=p.to_local().device)
              for p in shared]
    try:
        for i, loss in enumerate(losses):
            # An ordinary backward pass: FSDP all-gathers, reduce-scatters and reshards.
            loss.backward(retain_graph=retain_graph or i < k - 1)
            for p, block in zip(shared, blocks):
                if p.grad is not None:
                    block[i] = p.grad.to_local()
                    p.grad = None
    finally:
        for p, g in zip(shared, saved):
            p.grad = g
    block_gram = torch.stack([_gram(b) for b in blocks])
    dist.all_reduce(block_gram, group=group)  # each rank's shards' contributions, summed
    return ShardedTaskGradients(block_gram.sum(0), blocks, shared, None, "parameters",
                                block_gram)
