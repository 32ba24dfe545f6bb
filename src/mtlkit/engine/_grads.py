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
* ``"gramian"`` (Gram-only): one vectorised backward over all K tasks in which each shared
  parameter's K task gradients are folded into the Gram matrix as soon as autograd produces
  them (a hook per parameter), so the K x P Jacobian is never held; ``sum_k w_k g_k`` is then
  written by one weighted backward pass. Only for methods that need nothing but the Gram
  matrix, in one process.
* ``"auto"``: batched in chunks of at most 16 tasks (split evenly: 40 tasks are 14 + 13 + 13);
  on CPUs the loop for up to 4 tasks (see :func:`auto_strategy`); an explicit ``chunk_size``
  means batched in even chunks of at most that size. Gram-only instead when the method needs
  only the Gram matrix and the Jacobian would exceed :data:`JACOBIAN_BUDGET` bytes.

Task-specific parameters (leaves reached from the losses that are not shared, and, when features
are given, not behind them) receive the plain gradient of their own task's loss. They are found
by walking the autograd graph of the losses, so the caller never lists them.

Under ``torch.distributed`` (DDP; run the forward pass under ``model.no_sync()``, since no
ordinary backward pass reaches DDP's hooks) the per-task gradients are those of the whole batch:
parameter blocks and task-specific gradients are averaged over the ranks, the features-mode Gram
matrix is summed (each rank holds other samples' features), and the features-mode update is
averaged after each rank's trunk pass. The weights are then the same on every rank.

Under FSDP (``fully_shard``; the shared parameters are DTensors) the task gradients are taken by
K ordinary backward passes that FSDP reduce-scatters, and the Gram matrix is summed over the
ranks' shards: see :mod:`mtlkit.engine._fsdp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.engine._dist import all_mean, all_mean_list, world_size

GradOn = Literal["parameters", "features"]
Strategy = Literal["auto", "batched", "loop", "gramian"]
GRAD_ON: tuple[str, ...] = ("parameters", "features")
STRATEGIES: tuple[str, ...] = ("auto", "batched", "loop", "gramian")
#: Above this many bytes of K x P Jacobian, ``strategy="auto"`` takes the Gram-only path for a
#: method that needs only the Gram matrix (40 tasks on a ResNet-18 trunk, 11.2M parameters:
#: 1.8 GB in float32, Gram-only; the speed benchmark's encoder, 40 x 0.1M: 16 MB, Jacobian).
JACOBIAN_BUDGET = 2**30
#: At most this many tasks per vectorised backward under ``strategy="auto"`` (split evenly, see
#: :func:`chunk_sizes`). On GPUs a vectorised backward over many tasks runs them in parallel;
#: 16 bounds the K-fold activation-gradient memory. On CPUs (one torch thread, the speed
#: benchmark's K=40 problem, step time / plain sum, median of 9 repeats, 2026-12-01): chunks of
#: at most 8 (5 passes), 16 (14 + 13 + 13) and 20 (2 passes) took 12.0x, 11.4x and 10.9x with
#: peak memory 14.0, 19.4 and 26.1 MiB; TorchJD, all 40 at once, 13.6x and 44.1 MiB. Fewer,
#: larger chunks are faster (fewer, larger kernels); 16 keeps the peak under half of
#: all-at-once.
AUTO_CHUNK = {"cuda": 16, "cpu": 16}
#: Up to this many tasks, ``strategy="auto"`` runs K ordinary backward passes (the loop). On
#: CPUs a vectorised backward buys no parallelism, only fewer calls, and its batching rules
#: cost extra work: on the speed benchmark's K=3 problem (ResNet-style encoder with batch norm,
#: batch 8, 48x48, one thread) parameters mode took 3.05x a plain sum vectorised and 2.05x
#: looped (TorchJD, vectorised: 2.96x), with the batch-norm backward 12x and the copies 6x as
#: expensive under ``torch.vmap``. With few tasks the calls saved are few; with many (K=40)
#: chunks of 8 were faster than the loop on that problem (11.8x vs 15.1x).
AUTO_LOOP_TASKS = {"cuda": 0, "cpu": 4}


def auto_strategy(k: int, device_type: str, chunk_size: int | None = None) -> tuple[str, int]:
    """(strategy, tasks per backward) that ``strategy="auto"`` uses for K tasks on a device."""
    if chunk_size is not None:
        return "batched", chunk_size
    if k <= AUTO_LOOP_TASKS.get(device_type, 0):
        return "loop", 1
    return "batched", AUTO_CHUNK.get(device_type, 16)


@dataclass
class TaskGradients:
    """Per-task gradients of one step, and how to write a combination of them.

    Attributes:
        gramian: K x K Gram matrix of the task gradients (in the chosen space), float64,
            computed at a safe scale (finite for every finite gradient).
        blocks: per-task gradient blocks, each (K, *shape) (one per shared parameter, or the
            single feature tensor in features mode).
        block_gramians: (B, K, K, float64), the Gram matrix of each block; they sum to
            ``gramian``.
        pending: Gram-only path: (outputs, rows) whose weighted backward pass writes
            ``sum_k w_k g_k`` (the graph is still held); ``blocks`` is then empty.
        loss_scale: the factor the differentiated losses carried (a gradient scaler's scale;
            see :meth:`unscale`): the blocks hold scaled gradients, and what is written is scaled
            back, for the scaler to unscale.
        retain_graph: the backward passes that write the update (Gram-only and features mode)
            keep the graph (see :func:`task_gradients`).
    """

    gramian: Tensor
    blocks: list[Tensor]
    shared: list[Tensor]
    features: Tensor | None
    grad_on: GradOn
    block_gramians: Tensor
    pending: tuple[Tensor, Tensor] | None = None
    loss_scale: Tensor | None = None
    retain_graph: bool = False

    def unscale(self, scale: Tensor) -> None:
        """The losses were multiplied by ``scale``: divide the Gram matrices by ``scale^2`` and,
        from now on, give :meth:`jacobian_matrix` divided by ``scale`` and write
        :meth:`apply_vector`'s vector multiplied by it. Weights computed from these are those of
        the unscaled losses; the gradients written are ``scale`` times the unscaled update
        (:meth:`apply_weights` and :meth:`apply_block_weights` combine the scaled gradients)."""
        inv2 = scale.double().reciprocal() ** 2
        self.gramian = self.gramian * inv2
        self.block_gramians = self.block_gramians * inv2
        self.loss_scale = scale

    def jacobian_matrix(self) -> Tensor:
        """The K x P matrix of task gradients (materialised on demand)."""
        self._need_blocks()
        k = self.blocks[0].shape[0]
        out = torch.cat([b.reshape(k, -1) for b in self.blocks], dim=1)
        if self.loss_scale is not None:
            out.div_(self.loss_scale.to(out.dtype))
        return out

    def apply_weights(self, weights: Tensor) -> None:
        """Accumulate ``sum_k w_k g_k`` into the shared parameters' ``.grad``."""
        if self.gram_only:
            # Gram-only: one backward pass of sum_k w_k (row_k . outputs), freeing the graph.
            if self.pending is None:
                raise RuntimeError("the Gram-only update was already written (its graph is freed)")
            outputs, rows = self.pending
            self.pending = None
            grad = torch.tensordot(weights.to(rows.dtype), rows, dims=1)
            out = torch.autograd.grad(outputs, self.shared, grad, allow_unused=True,
                                      materialize_grads=True, retain_graph=self.retain_graph)
            for p, g in zip(self.shared, out):
                _accumulate(p, g, owned=True)
            return
        combined = [torch.tensordot(weights.to(b.dtype), b, dims=1) for b in self.blocks]
        self._write(combined, owned=True)

    @property
    def gram_only(self) -> bool:
        """Whether these are the Gram-only path's (no per-task gradients held)."""
        return not self.blocks

    def _need_blocks(self) -> None:
        if self.gram_only:
            raise RuntimeError(
                "the Gram-only path (strategy='gramian') holds no per-task gradients: only "
                "apply_weights can write its update"
            )

    def apply_block_weights(self, weights: Tensor) -> None:
        """Accumulate ``sum_k W[b, k] g_k^(b)`` into block b, for per-block weights (B, K)."""
        self._need_blocks()
        combined = [torch.tensordot(w.to(b.dtype), b, dims=1) for w, b in zip(weights, self.blocks)]
        self._write(combined, owned=True)

    def apply_vector(self, vector: Tensor) -> None:
        """Accumulate a combined gradient given as a flat vector of the task-gradient space."""
        self._need_blocks()
        if self.loss_scale is not None:
            vector = vector * self.loss_scale.to(vector.dtype)
        out, offset = [], 0
        for b in self.blocks:
            n = b[0].numel()
            out.append(vector[offset : offset + n].reshape(b.shape[1:]).to(b.dtype))
            offset += n
        self._write(out)

    def _write(self, combined: list[Tensor], owned: bool = False) -> None:
        if self.grad_on == "features":
            assert self.features is not None
            if world_size() == 1:
                torch.autograd.backward(self.features, combined[0], inputs=self.shared,
                                        retain_graph=self.retain_graph)
                return
            # Each rank pushes its own samples' part through its trunk: average the results.
            grads = torch.autograd.grad(self.features, self.shared, combined[0],
                                        allow_unused=True, materialize_grads=True,
                                        retain_graph=self.retain_graph)
            combined, owned = all_mean_list(grads), True
        for p, g in zip(self.shared, combined):
            _accumulate(p, g, owned=owned)


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    features: Tensor | None = None,
    *,
    grad_on: GradOn = "parameters",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    need_jacobian: bool = False,
    retain_graph: bool = False,
    need_gramian: bool = True,
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
        need_jacobian: the caller will read the task gradients themselves (the blocks or
            :meth:`TaskGradients.jacobian_matrix`), not only their Gram matrix.
        retain_graph: keep the graph of the losses (by default the last backward pass frees
            it, as a plain ``backward()``): a second call can then run through nodes the two
            sets of losses share (two batches' losses whose graphs may overlap). The passes
            that write the update (Gram-only and features mode) keep it too.
        need_gramian: with ``need_jacobian``, ``False`` skips the Gram matrices of the
            parameters-mode blocks (``gramian`` and ``block_gramians`` are then empty, 0 x 0
            and 0 x K x K), for a caller that reads only the blocks.

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
    if not need_gramian and not need_jacobian:
        raise ValueError("need_gramian=False needs need_jacobian=True: nothing would be read")
    if grad_on == "features" and need_jacobian and world_size() > 1:
        raise NotImplementedError(
            "a balancer that reads the task gradients themselves (not only their Gram matrix) "
            "cannot combine them at the features across processes: each rank holds other "
            "samples' features; use grad_on='parameters' under torch.distributed"
        )
    k = len(losses)
    shared = list(shared)
    if world_size() > 1:
        from mtlkit.engine import _fsdp

        if _fsdp.is_sharded(shared):
            return _fsdp.sharded_task_gradients(losses, shared, features, grad_on=grad_on,
                                                strategy=strategy, retain_graph=retain_graph)
        if _fsdp.uses_fsdp(losses):
            raise ValueError(_FSDP_UNSHARDED)
    explicit = strategy in ("batched", "gramian")
    gram_only = _gram_only(strategy, k, shared, grad_on, need_jacobian)
    if strategy == "auto":
        device = shared[0].device if len(shared) else torch.device("cpu")
        strategy, chunk_size = auto_strategy(k, device.type, chunk_size)
    shared_ids = {id(p) for p in shared}
    if len(shared_ids) != len(shared):
        raise ValueError("shared lists a parameter twice: its update would be counted twice")
    if features is not None and id(features) in shared_ids:
        raise ValueError("features must be the shared representation, not a shared parameter")
    found = _task_leaves(losses, shared_ids, features)
    heads, own_heads, overlap = found.heads, found.by_loss, found.overlap
    if found.bypass and features is not None:
        # A shared parameter reaches the losses without going through the features (e.g. tied
        # weights in a head, or a model compiled whole): splitting at the features would drop
        # that part of its gradient.
        if grad_on == "features":
            if found.fused:
                raise ValueError(
                    "the features and the losses come out of one torch.compile-d graph (the "
                    "model was compiled whole), so the losses' gradients at the features cannot "
                    "be taken; compile the trunk and the heads separately, or end the trunk "
                    "with torch._dynamo.graph_break() (mtlkit.nn.HardSharing does), or use "
                    "grad_on='parameters'"
                )
            raise ValueError(
                "a shared parameter is used after the features (it reaches the losses without "
                "passing through them), so grad_on='features' cannot account for it; use "
                "grad_on='parameters'"
            )
        features = None
        found = _task_leaves(losses, shared_ids, None)
        heads = found.heads
    compiled = found.compiled  # the whole graph was walked when there are no features

    if compiled and gram_only and strategy == "gramian":
        raise ValueError(
            "strategy='gramian' cannot run through a torch.compile-d model (a compiled "
            "backward cannot run under torch.vmap); use strategy='auto' or 'loop'"
        )
    gram_only = gram_only and not compiled
    if features is not None:
        compiled = _check_trunk_is_shared(features, shared_ids) or compiled
        strategy, chunk_size = _sequential_if_compiled(strategy, chunk_size, compiled, explicit)
        gram_only = gram_only and not compiled
        # Heads pass: per task, dL_k/dz and the task's own head gradients. A loop touches only
        # task k's head each time, so it costs one backward through all heads in total. When
        # the tasks share no operation above z, each head's graph is freed as soon as it has
        # been differentiated (as a plain backward would), which lowers the peak memory.
        dz_stack = torch.empty((k, *features.shape), dtype=features.dtype,
                               device=features.device)
        head_grads: list[tuple[Tensor, Tensor]] = []
        for i, loss in enumerate(losses):
            # Without overlap each loss reaches only its own head (fewer inputs: a cheaper call).
            mine = heads if overlap else own_heads[i]
            out = torch.autograd.grad(
                loss, [features, *mine], retain_graph=overlap or retain_graph, allow_unused=True
            )
            if out[0] is None:
                dz_stack[i].zero_()
            else:
                dz_stack[i] = out[0]
            head_grads.extend((p, g) for p, g in zip(mine, out[1:]) if g is not None)
            del out
        _accumulate_mean(head_grads)
        if grad_on == "features":
            ranks = world_size()
            # The features of the whole batch are every rank's, side by side: the Gram matrix
            # of the batch-mean losses' gradients is the sum of the ranks' own, over ranks^2.
            gram = _gram(dz_stack.reshape(k, -1))
            if ranks > 1:
                gram = all_mean(gram) / ranks
            return TaskGradients(gram, [dz_stack], shared, features, grad_on, gram[None],
                                 retain_graph=retain_graph)
        if gram_only:
            block_gram, _ = _gram_pass(features, shared, dz_stack, len(shared))
            return TaskGradients(block_gram.sum(0), [], shared, None, grad_on, block_gram,
                                 pending=(features, dz_stack), retain_graph=retain_graph)
        blocks = all_mean_list(_batched_or_loop(
            features, shared, dz_stack, strategy, chunk_size, outputs_are_losses=False,
            retain_graph=retain_graph,
        ))
    else:
        strategy, chunk_size = _sequential_if_compiled(strategy, chunk_size, compiled, explicit)
        if gram_only:
            stacked = torch.stack([_scalar(loss) for loss in losses])
            rows = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
            block_gram, head_blocks = _gram_pass(stacked, [*shared, *heads], rows, len(shared))
            for p, g in zip(heads, head_blocks):
                _accumulate(p, g.sum(0), owned=True)
            return TaskGradients(block_gram.sum(0), [], shared, None, grad_on, block_gram,
                                 pending=(stacked, rows), retain_graph=retain_graph)
        # Vectorised passes: the heads receive their gradient (of the sum of the losses) from
        # one plain pass first, so that the vectorised ones compute no per-task head gradients
        # (K blocks of each head, mostly zeros). A loop's pass k reaches only task k's head.
        vectorised = strategy != "loop" and k > 1 and bool(heads)
        if vectorised:
            _accumulate_mean(list(zip(heads, torch.autograd.grad(
                [_scalar(loss) for loss in losses if loss.requires_grad], heads, retain_graph=True,
                allow_unused=True, materialize_grads=True))))
        inputs = shared if vectorised else [*shared, *heads]
        blocks = all_mean_list(_batched_or_loop(
            losses, inputs, None, strategy, chunk_size, outputs_are_losses=True,
            retain_graph=retain_graph,
        ))
        for p, g in zip(heads, blocks[len(shared):] if not vectorised else []):
            _accumulate(p, g.sum(0), owned=True)
        blocks = blocks[: len(shared)]
    if not need_gramian:
        empty = torch.zeros((0, k, k), dtype=torch.float64,
                            device=blocks[0].device if blocks else None)
        return TaskGradients(empty.new_zeros((0, 0)), blocks, shared, None, grad_on, empty)
    block_gram = torch.stack([_gram(b) for b in blocks])
    return TaskGradients(block_gram.sum(0), blocks, shared, None, grad_on, block_gram)


def task_jacobian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    retain_graph: bool = True,
) -> list[Tensor]:
    """Per-task gradients of ``inputs`` as blocks (K, *shape), with no side effect on ``.grad``.

    One vectorised backward (in chunks of ``chunk_size`` tasks; by default as
    ``strategy="auto"``) that stops at ``inputs``; the graph is kept by default so that the
    caller can still run its own backward pass (GradNorm reads the gradients of the last shared
    layer, then backpropagates ``sum_k w_k L_k``). Under ``torch.distributed`` the blocks are
    averaged over the ranks (the gradients of the whole batch's mean losses).
    """
    if world_size() > 1:
        from mtlkit.engine import _fsdp

        if _fsdp.is_sharded(inputs):
            raise NotImplementedError(
                "the per-task gradients of a layer (GradNorm-style methods) are not supported "
                "with FSDP-sharded parameters; use a loss weighting or a Gram-based method"
            )
    if chunk_size is None and len(inputs):
        chunk_size = AUTO_CHUNK.get(inputs[0].device.type, 16)
    strategy = "loop" if _graph_is_compiled(losses) else "batched"
    return all_mean_list(_batched_or_loop(
        losses, list(inputs), None, strategy, chunk_size, outputs_are_losses=True,
        retain_graph=retain_graph,
    ))


_FSDP_UNSHARDED = (
    "the losses come out of FSDP (fully_shard) modules, but shared holds plain parameters, not "
    "FSDP's sharded DTensors (a root FSDP module's parameters() gives its unsharded copies "
    "between forward and backward), and gradients written there are never reduce-scattered; "
    "pass the sharded parameters (those the optimiser holds, e.g. a list taken when it is built)"
)


def _batched_or_loop(
    outputs: Tensor | Sequence[Tensor],
    inputs: list[Tensor],
    grad_rows: Tensor | None,
    strategy: str,
    chunk_size: int | None,
    *,
    outputs_are_losses: bool,
    retain_graph: bool = False,
) -> list[Tensor]:
    """Rows of the Jacobian of ``outputs`` w.r.t. ``inputs``: one row per task.

    When ``outputs_are_losses``, ``outputs`` are the K scalar losses and the rows the unit
    vectors (task k's loss alone); each chunk differentiates only its own losses, so that a
    backward pass never runs through another loss's graph with zero gradients (the other heads,
    or a second batch's whole trunk). Otherwise ``grad_rows[k]`` is the gradient to push back
    from the tensor ``outputs`` (dL_k/dz). The graph is freed after the last chunk unless
    ``retain_graph``.
    """
    losses: list[Tensor] | None = None
    if outputs_are_losses:
        losses = [_scalar(loss) for loss in outputs]
        k = len(losses)
        dtype = losses[0].dtype
        for loss in losses[1:]:
            dtype = torch.promote_types(dtype, loss.dtype)
        rows = torch.eye(k, dtype=dtype, device=losses[0].device)
    else:
        assert grad_rows is not None and isinstance(outputs, Tensor)
        k = grad_rows.shape[0]
        rows = grad_rows
    sizes = chunk_sizes(k, 1 if strategy == "loop" else (chunk_size or k))
    # Chunks are written into preallocated (K, *shape) blocks: no concatenation, so the
    # Jacobian is held once, not twice, at the end of a chunked pass.
    blocks: list[Tensor] | None = None
    start = 0
    for i, size in enumerate(sizes):
        keep = retain_graph or i < len(sizes) - 1
        if losses is None:
            assert isinstance(outputs, Tensor)
            out = _vjp_rows(outputs, inputs, rows[start : start + size], keep)
        else:
            mine = torch.stack(losses[start : start + size]).to(rows.dtype)
            chunk = rows[:size, :size]
            out = (_vjp_rows(mine, inputs, chunk, keep) if mine.requires_grad else
                   tuple(p.new_zeros((size, *p.shape)) for p in inputs))
        if size == k:  # a single chunk: use autograd's tensors as they are
            return list(out)
        if blocks is None:
            blocks = [torch.empty((k, *p.shape), dtype=p.dtype, device=p.device) for p in inputs]
        for block, g in zip(blocks, out):
            block[start : start + size] = g
        del out
        start += size
    assert blocks is not None
    return blocks


def _gram_only(strategy: str, k: int, shared: list[Tensor], grad_on: str,
               need_jacobian: bool) -> bool:
    """Whether to take the Gram-only path (see the module docstring)."""
    if strategy == "gramian":
        if need_jacobian or grad_on != "parameters" or world_size() > 1:
            raise ValueError(
                "strategy='gramian' (Gram-only) serves methods that need only the Gram matrix, "
                "with grad_on='parameters', in one process (under torch.distributed the ranks' "
                "Gram matrices do not add up to the whole batch's)"
            )
        return True
    if strategy != "auto" or need_jacobian or grad_on != "parameters" or world_size() > 1:
        return False
    size = sum(p.numel() * p.element_size() for p in shared)
    return k > 1 and k * size > JACOBIAN_BUDGET


def _gram_pass(
    outputs: Tensor, inputs: list[Tensor], rows: Tensor, n_shared: int, *,
    per_layer: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """One vectorised backward over all rows that keeps, of the first ``n_shared`` inputs, only
    their Gram matrices (n_shared, K, K); the other inputs' blocks (K, *shape) are returned.
    The graph is kept for the weighted backward pass that follows.

    A hook on each shared parameter receives its K task gradients as autograd produces them
    (inside ``torch.vmap``, a batched tensor: functorch's unwrap gives the (K, ...) tensor),
    adds their Gram matrix and hands autograd a zero of stride 0 instead, so that at most one
    parameter's K gradients are alive at a time.

    With ``per_layer``, the weight of a convolution or linear layer whose K gradients would
    take more memory than its per-layer form (see :func:`_layer_gram_plan`) is left out of the
    backward pass altogether, so autograd never makes its (K, *shape) block: a hook on the
    layer's node folds the layer's Gram matrix from its saved input and its K output gradients
    instead.
    """
    k = rows.shape[0]
    block_gram = torch.zeros((n_shared, k, k), dtype=torch.float64, device=outputs.device)
    layers = _layer_gram_plan(outputs, inputs[:n_shared], k) if per_layer else {}
    fired = dict.fromkeys(layers, 0)

    def tap(i: int) -> Any:
        def hook(grad: Tensor) -> Tensor:
            block_gram[i] += _gram(_unbatched(grad, k))
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)
        return hook

    def tap_layer(i: int, layer: _Layer) -> Any:
        def prehook(grad_outputs: tuple[Tensor, ...]) -> None:
            fired[i] += 1
            block_gram[i] += layer.gram(_unbatched(grad_outputs[0], k))
        return prehook

    handles = [p.register_hook(tap(i)) for i, p in enumerate(inputs[:n_shared])
               if i not in layers]
    handles += [layer.node.register_prehook(tap_layer(i, layer)) for i, layer in layers.items()]
    kept = [p for i, p in enumerate(inputs) if i not in layers]
    try:
        out = _vjp_rows(outputs, kept, rows, keep=True)
    finally:
        for h in handles:
            h.remove()
    if any(n != 1 for n in fired.values()):
        # A layer's node did not run (nothing below it needed a gradient): fold every
        # parameter by its hook instead (the graph is kept).
        return _gram_pass(outputs, inputs, rows, n_shared, per_layer=False)
    return block_gram, list(out[n_shared - len(layers):])


@dataclass
class _Layer:
    """A convolution or linear node whose weight's task gradients are ``D_k P^T``: ``P`` (C, M)
    the layer's inputs (unfolded patches for a convolution), ``D_k`` (O, M) task k's output
    gradients, over the M = samples x positions of the batch. Their Gram matrix is
    ``G[k, j] = <D_k S, D_j>`` with ``S = P^T P`` (M x M), so neither the K weight gradients
    nor a (K, O, C) temporary is ever made."""

    node: Any
    kind: str  # "conv", "linear" (addmm: with a bias) or "mm"

    def patches(self) -> Tensor:
        node = self.node
        if self.kind == "conv":
            x = node._saved_input
            w = node._saved_weight
            cols = torch.nn.functional.unfold(
                x, w.shape[2:], dilation=node._saved_dilation, padding=node._saved_padding,
                stride=node._saved_stride)  # (N, C*kh*kw, L)
            return cols.transpose(0, 1).reshape(cols.shape[1], -1)
        x = node._saved_mat1 if self.kind == "linear" else node._saved_self
        return x.T  # (C, N)

    def gram(self, grad_out: Tensor) -> Tensor:
        k = grad_out.shape[0]
        if self.kind == "conv":  # (K, N, O, H', W') -> (K, O, N * L)
            d = grad_out.flatten(3).transpose(1, 2).reshape(k, grad_out.shape[2], -1)
        else:  # (K, N, O) -> (K, O, N)
            d = grad_out.transpose(1, 2)
        p = self.patches()
        dtype = torch.float64 if torch.float64 in (d.dtype, p.dtype) else torch.float32
        # a safe scale, as _gram: unit-magnitude factors, the scales restored in float64
        d_scale, p_scale = unit_scale(d, dtype), unit_scale(p, dtype)
        pu = p.to(dtype) / p_scale
        du = (d.to(dtype) / d_scale).reshape(-1, pu.shape[1])  # (K * O, M)
        e = (du @ (pu.T @ pu)).reshape(k, -1)  # D_k S, flattened per task
        gram = (e @ du.reshape(k, -1).T).double()
        return gram * (d_scale.double() * p_scale.double()) ** 2


def _layer_gram_plan(outputs: Tensor, shared: list[Tensor], k: int) -> dict[int, _Layer]:
    """The shared weights whose Gram matrix is cheaper per layer (:class:`_Layer`): each the
    weight of exactly one 2-d convolution (groups 1, not transposed) or linear layer of the
    graph, whose K task gradients (K x weight elements) would outweigh the per-layer form's
    memory (M x M for S plus two K x O x M factors) at least twice over."""
    index = {id(p): i for i, p in enumerate(shared)}
    parents: dict[Any, list[tuple[Any, int]]] = {}  # node -> the (node, slot) edges into it
    leaves: dict[int, Any] = {}  # shared parameter id -> its AccumulateGrad node
    for node in graph_nodes([outputs]):
        for slot, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            parents.setdefault(child, []).append((node, slot))
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in index:
                leaves[id(variable)] = child
    found: dict[int, tuple[Any, str]] = {}
    for key, leaf in leaves.items():
        edges = parents[leaf]
        if len(edges) != 1:
            continue  # used twice: its Gram matrix is not a sum over the uses
        node, slot = edges[0]
        if node.name() == "ConvolutionBackward0" and slot == 1:
            found[key] = (node, "conv")
        elif (node.name() == "TBackward0" or (node.name() == "PermuteBackward0"
                                              and tuple(node._saved_dims) == (1, 0))) \
                and len(parents[node]) == 1:  # the weight transposed (F.linear, x @ w.T)
            user, user_slot = parents[node][0]
            if (user.name(), user_slot) == ("AddmmBackward0", 2):
                found[key] = (user, "linear")
            elif (user.name(), user_slot) == ("MmBackward0", 1):
                found[key] = (user, "mm")
    plan: dict[int, _Layer] = {}
    for key, (node, kind) in found.items():
        weight = shared[index[key]]
        if kind == "conv":
            if node._saved_transposed or node._saved_groups != 1 or weight.dim() != 4 \
                    or node.next_functions[0][0] is None:
                continue
            x = node._saved_input
            positions = x.shape[0]
            for size, kernel, pad, dil, stride in zip(
                    x.shape[2:], weight.shape[2:], node._saved_padding, node._saved_dilation,
                    node._saved_stride):
                positions *= (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
            out_channels = weight.shape[0]
        else:
            x = node._saved_mat1 if kind == "linear" else node._saved_self
            upstream = node.next_functions[1 if kind == "linear" else 0][0]
            if x.dim() != 2 or upstream is None:
                continue
            positions, out_channels = x.shape[0], weight.shape[0]
        per_layer = positions * positions + 2 * k * out_channels * positions
        if 2 * per_layer < k * weight.numel():
            plan[index[key]] = _Layer(node, kind)
    return plan


def _unbatched(grad: Tensor, k: int) -> Tensor:
    """The (K, *shape) tensor behind a gradient seen inside ``torch.vmap`` over K rows (a
    private functorch API; a gradient the rows do not change arrives unbatched)."""
    from torch._C import _functorch

    level = _functorch.maybe_get_level(grad)
    if level == -1:  # not batched: one backward row, or the same for every row
        return grad.unsqueeze(0).expand(k, *grad.shape)
    inner, bdim = _functorch._unwrap_batched(grad, level)
    return inner.movedim(bdim, 0)


def chunk_sizes(k: int, at_most: int) -> list[int]:
    """Split K tasks into the fewest chunks of at most ``at_most``, as even as possible.

    Even chunks need as many backward passes as greedy ones and a smaller largest chunk (the
    peak memory): 40 tasks in chunks of at most 16 are 14 + 13 + 13, not 16 + 16 + 8.

    Example:
        >>> chunk_sizes(40, 16), chunk_sizes(5, 8), chunk_sizes(3, 1)
        ([14, 13, 13], [5], [1, 1, 1])
    """
    if k <= 0:
        return []
    n = -(-k // max(1, min(at_most, k)))
    return [k // n + (1 if i < k % n else 0) for i in range(n)]


def _vjp_rows(
    outputs: Tensor, inputs: list[Tensor], rows: Tensor, keep: bool
) -> tuple[Tensor, ...]:
    """``rows[i]^T d outputs / d inputs`` for every row, stacked: (len(rows), *input.shape).

    Several rows go through one vectorised backward with ``torch.vmap`` (functorch's batching
    rules; much faster than the legacy ``is_grads_batched`` path, which falls back to slow
    loops for many ops); a single row through a plain backward.
    """

    def vjp(row: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            outputs, inputs, row, retain_graph=keep, allow_unused=True, materialize_grads=True
        )

    if rows.shape[0] == 1:
        return tuple(g.unsqueeze(0) for g in vjp(rows[0]))
    try:
        out: tuple[Tensor, ...] = torch.vmap(vjp)(rows)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        raise RuntimeError(
            "the vectorised backward over the tasks (torch.vmap) is not supported by an "
            f"operation of this model ({err}); use strategy='loop' (K ordinary backward passes)"
        ) from err
    return out


def cosine_from_gramian(gramian: Tensor) -> Tensor:
    """Pairwise cosine similarity of the task gradients from their K x K Gram matrix; a task
    whose gradient is zero has cosine 0 with every task.

    Example:
        >>> import torch
        >>> cosine_from_gramian(torch.tensor([[1.0, -2.0, 0.0], [-2.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
        tensor([[ 1., -1.,  0.],
                [-1.,  1.,  0.],
                [ 0.,  0.,  0.]])
    """
    norms = gramian.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gramian / denom.clamp_min(torch.finfo(gramian.dtype).tiny), 0.0)


def _scalar(loss: Tensor) -> Tensor:
    """``loss`` as a 0-d tensor, without adding a view node when it already is one."""
    return loss if loss.dim() == 0 else loss.reshape(())


#: Elements of a (K, ...) gradient block turned into one Gram-matrix product at a time: bounds
#: the temporaries (a copy of a strided block, its scaled rows) to 16 MB in float32, where one
#: ResNet-18 kernel's 40 task gradients alone take 377 MB.
GRAM_CHUNK = 1 << 22


def unit_scale(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The largest magnitude in ``t`` (1 when ``t`` is empty or zero) as a 0-d tensor of
    ``dtype`` (by default ``t``'s, at least float32: bf16 Gram matrices lose the small conflicts
    that matter): ``t`` divided by it has entries of magnitude at most 1, whose products cannot
    overflow or underflow where ``t``'s would. Reduced without a ``t``-sized temporary, and on
    the device (no host synchronisation)."""
    top = torch.linalg.vector_norm(t, float("inf")) if t.numel() else \
        t.new_zeros((), dtype=torch.float32)
    if dtype is None:
        dtype = top.dtype if top.dtype in (torch.float32, torch.float64) else torch.float32
    top = top.to(dtype)
    return torch.where(top > 0, top, torch.ones_like(top))


def _gram(block: Tensor) -> Tensor:
    """``flat @ flat.T`` in float64 for the (K, ...) block ``block`` (``flat`` its rows, one per
    task), computed at a safe scale: the rows are divided by their largest magnitude before the
    product (in the gradients' precision, at least float32) and the result is rescaled in
    float64. A float32 Gram matrix overflows for gradients from about 1e19 and underflows below
    1e-23; this one is finite and exact to float32 rounding for every finite gradient (no host
    synchronisation: the scale stays on the device).

    The product is accumulated over slices of the block's second dimension of at most
    :data:`GRAM_CHUNK` elements, so that no temporary as large as the block is made: a block
    whose layout does not flatten in place (the task gradients a vectorised backward produces)
    is copied one slice at a time."""
    k = block.shape[0]
    if block.dim() == 1:
        block = block.unsqueeze(1)
    scale = unit_scale(block)
    row = max(1, block[0].numel())
    width = block.shape[1]
    step = max(1, (GRAM_CHUNK // k) // max(1, row // max(width, 1)))
    gram = torch.zeros((k, k), dtype=torch.float64, device=block.device)
    for start in range(0, width, step):
        unit = block[:, start:start + step].reshape(k, -1).to(scale.dtype) / scale
        gram += (unit @ unit.T).double()
    return gram * scale.double() ** 2


def _accumulate_mean(grads: list[tuple[Tensor, Tensor]]) -> None:
    """Accumulate (parameter, gradient) pairs, each gradient averaged over the ranks first."""
    for (p, _), g in zip(grads, all_mean_list([g for _, g in grads])):
        _accumulate(p, g)


def _accumulate(p: Tensor, g: Tensor, *, owned: bool = False) -> None:
    """Add ``g`` to ``p.grad``. ``owned``: g is a fresh contiguous tensor nobody else holds, so
    it can become ``p.grad`` without a copy (autograd's outputs may be views, so they are
    copied)."""
    g = g.detach().to(p.dtype)
    if p.grad is None:
        p.grad = g if owned and g.is_contiguous() else g.clone()
    else:
        p.grad.add_(g)


def _task_leaves(
    losses: Sequence[Tensor], exclude: set[int], features: Tensor | None
) -> _Leaves:
    """Leaves that require grad, reached from the losses without passing through ``features``
    and not in ``exclude``: the task-specific parameters. Order is deterministic.

    The walk follows each edge's output index, so it survives a node with several outputs, such
    as the single node of a model compiled whole by ``torch.compile``: a loss that reaches the
    features' node through another of its outputs does not go through the features, and the
    walk continues through that node (``fused``).
    """
    stop = features.grad_fn if features is not None else None
    stop_nr = features.output_nr if features is not None else -1
    owner: dict[int, int] = {}
    found: dict[int, Tensor] = {}
    out = _Leaves([], [], False, False, False, False)
    for k, loss in enumerate(losses):
        own: list[Tensor] = []
        own_ids: set[int] = set()
        out.by_loss.append(own)
        stack = [(loss.grad_fn, loss.output_nr)] if loss.grad_fn is not None else []
        while stack:
            node, nr = stack.pop()
            if node is None:
                continue
            if node is stop:
                if nr == stop_nr:
                    continue
                out.fused = True  # another output of the features' node: walk through it
            var = getattr(node, "variable", None)
            if var is not None:  # an AccumulateGrad node: a leaf parameter
                if id(var) in exclude:
                    out.bypass = True
                elif var is not features:
                    if id(var) not in own_ids:  # a leaf of two heads belongs to both
                        own_ids.add(id(var))
                        own.append(var)
                    found.setdefault(id(var), var)
                continue
            seen_by = owner.get(id(node))
            if seen_by is not None:
                out.overlap = out.overlap or seen_by != k
                continue
            owner[id(node)] = k
            out.compiled = out.compiled or _is_compiled(node)
            stack.extend((nxt, i) for nxt, i in reversed(node.next_functions) if nxt is not None)
    out.heads = list(found.values())
    return out


@dataclass
class _Leaves:
    """What :func:`_task_leaves` found above the features.

    Attributes:
        heads: the task-specific leaves (every loss's).
        by_loss: each loss's own such leaves (complete only when no two losses share an
            operation above the features).
        bypass: an excluded (shared) leaf was reached: a shared parameter influences the losses
            other than through the features.
        overlap: two losses share an operation above the features (a backward pass from one
            of them must keep the graph for the others).
        compiled: a node of a ``torch.compile``-d graph was passed (its backward cannot run
            under ``torch.vmap``).
        fused: a loss reached the features' node through another of its outputs (the features
            and the heads are computed in one compiled graph).
    """

    heads: list[Tensor]
    by_loss: list[list[Tensor]]
    bypass: bool
    overlap: bool
    compiled: bool
    fused: bool


def _is_compiled(node: Any) -> bool:
    """Whether an autograd node is the backward of a ``torch.compile``-d graph (AOTAutograd)."""
    return type(node).__name__ == "CompiledFunctionBackward"


def _check_trunk_is_shared(features: Tensor, shared_ids: set[int]) -> bool:
    """Raise if a parameter behind ``features`` is not in ``shared``; return whether the trunk
    holds a ``torch.compile``-d node.

    Such a parameter influences every task through the features, but the trunk's backward pass
    writes only the listed shared parameters: it would silently get no gradient at all.
    """
    if features.grad_fn is None:
        return False
    stack, seen = [features.grad_fn], set()
    missing: list[Tensor] = []
    compiled = False
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            if isinstance(var, torch.nn.Parameter) and id(var) not in shared_ids:
                missing.append(var)
            continue
        compiled = compiled or _is_compiled(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:5])
        raise ValueError(
            f"{len(missing)} parameter(s) computed into the features are not in shared "
            f"(shapes {shapes}{', ...' if len(missing) > 5 else ''}): they influence every task "
            "through the features, so list them in shared= (for an mtlkit.nn model, its "
            "shared_parameters() does), or they would receive no gradient"
        )
    return compiled


def _graph_is_compiled(roots: Sequence[Tensor]) -> bool:
    """Whether the autograd graph behind ``roots`` holds a ``torch.compile``-d node."""
    return graph_has(roots, _is_compiled)


def graph_nodes(roots: Sequence[Tensor]) -> Iterator[Any]:
    """The nodes of the autograd graph behind ``roots``, leaves (``AccumulateGrad``) excluded,
    each once."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen or getattr(node, "variable", None) is not None:
            continue
        seen.add(id(node))
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def graph_has(roots: Sequence[Tensor], match: Callable[[Any], bool]) -> bool:
    """Whether a node of the autograd graph behind ``roots`` (leaves excluded) satisfies
    ``match(node)``; each node is visited once, and the walk stops at the first match."""
    return any(match(node) for node in graph_nodes(roots))


def _sequential_if_compiled(strategy: str, chunk_size: int | None, compiled: bool,
                            explicit: bool) -> tuple[str, int | None]:
    """The loop instead of a vectorised backward through a compiled graph (whose backward cannot
    run under ``torch.vmap``, pytorch#138422); an explicit ``strategy="batched"`` is refused
    before any backward pass runs."""
    if not compiled or strategy == "loop":
        return strategy, chunk_size
    if explicit:
        raise ValueError(
            "strategy='batched' cannot run through a torch.compile-d model (a compiled "
            "backward cannot run under torch.vmap); use strategy='auto' or 'loop'"
        )
    return "loop", 1
