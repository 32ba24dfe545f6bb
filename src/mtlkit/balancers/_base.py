"""The balancer contract: validation, dispatch to the gradient engine, and the result of a step.

Every balancer is an :class:`torch.nn.Module` whose state (loss histories, learned parameters,
inner optimiser moments) is registered as buffers or parameters, so ``state_dict()`` /
``load_state_dict()`` round-trip exactly and a resumed run follows the same trajectory.

Subclasses implement one small hook, chosen by the class attribute ``requires``:

* ``"losses"``  -> :meth:`Balancer._loss_weights`: weights from the detached losses; the update is
  one backward pass of ``sum_k w_k L_k`` (methods with learned weights override
  :meth:`Balancer._objective` instead).
* ``"last_shared"`` -> :meth:`Balancer._last_shared_objective`: like ``"losses"`` (one backward
  pass of the returned objective), with the per-task gradients of the last shared layer given
  to the hook (GradNorm). The layer is chosen by :meth:`Balancer._select_last_shared`.
* ``"gramian"`` -> :meth:`Balancer._gramian_weights`: weights from the K x K Gram matrix of the
  per-task gradients; the engine writes ``sum_k w_k g_k`` without another backward pass.
* ``"block_gramian"`` -> :meth:`Balancer._block_weights`: one weight vector per block of shared
  parameters (one block per shared tensor), from each block's own Gram matrix (GradVac's
  per-layer granularity); block b receives ``sum_k W[b, k] g_k^(b)``.
* ``"jacobian"`` -> :meth:`Balancer._aggregate`: the combined shared gradient from the full
  K x P Jacobian (for methods that are not a linear combination, e.g. GradDrop).

Gradient methods may transform the losses before differentiating them
(:meth:`Balancer._transform_losses`, e.g. the log-loss of DB-MTL); effective weights are then
reported with respect to the gradients of the original losses.

Task-specific parameters (heads, i.e. every parameter reached from the losses that is not in
``shared``) always receive the plain gradient of their own task's loss, whatever the method.

Under ``torch.distributed`` the hooks see the whole batch: the loss values they get are the
means over the ranks (:meth:`Balancer._loss_values`), the engine averages the per-task
gradients, and the balancer's own parameters' gradients are averaged after the backward pass,
so every rank computes the same weights (``tests/engine/test_dist.py``: two ranks with half a
batch each equal one process with the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtlkit.engine import (
    GRAD_ON,
    STRATEGIES,
    GradOn,
    Strategy,
    TaskGradients,
    cosine_from_gramian,
    task_gradients,
    task_jacobian,
)
from mtlkit.engine._dist import all_mean, all_mean_list

Requirement = Literal["losses", "last_shared", "gramian", "block_gramian", "jacobian"]
Losses = Mapping[str, Tensor] | Sequence[Tensor]


@dataclass(frozen=True)
class BalanceStep:
    """What one :meth:`Balancer.backward` call did.

    The tensors stay on the device; the dict views (``weights``) synchronise with the host only
    when read, so logging them is the caller's choice.

    Attributes:
        tasks: task names, in the balancer's order.
        loss: the detached scalar ``sum_k w_k L_k`` whose gradient the shared parameters received
            (for learned balancers, plus their regulariser).
        weight_tensor: effective weight of each task's gradient in the shared update, shape (K,).
        gramian: the K x K Gram matrix of the task gradients, for gradient methods; else None.
    """

    tasks: tuple[str, ...]
    loss: Tensor
    weight_tensor: Tensor
    gramian: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        """Effective weight of each task in this update (reads the device once)."""
        return dict(zip(self.tasks, self.weight_tensor.detach().cpu().tolist()))

    @property
    def cosine(self) -> Tensor | None:
        """Pairwise cosine similarity of the task gradients (K x K), from the Gram matrix at no
        extra cost; None for methods that never compute per-task gradients. A task with a zero
        gradient has cosine 0 with every other task."""
        if self.gramian is None:
            return None
        return cosine_from_gramian(self.gramian)


class Balancer(nn.Module):
    """Base class of every balancer. See the module docstring for the contract.

    Args:
        tasks: the task names, in a fixed order (used for weights, state and reports).
        check_finite: raise on a non-finite loss (costs one host synchronisation per step).
    """

    #: What the balancer needs from the engine; the trainer and CLI read this, never a name.
    requires: ClassVar[Requirement] = "losses"
    #: Keyword context a step accepts (e.g. ``kpi`` for DTP); anything else is an error.
    context_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`after_step` must be called with the post-step losses (FAMO; an instance
    #: may set it from its options).
    needs_after_step: bool = False
    #: Registry name, set by :func:`mtlkit.balancers.register`.
    name: ClassVar[str] = ""

    step: Tensor

    def __init__(self, tasks: Sequence[str], *, check_finite: bool = True) -> None:
        super().__init__()
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a sequence of task names, got {tasks!r}")
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("tasks must name at least one task")
        for t in tasks:
            if not isinstance(t, str) or not t:
                raise ValueError(f"task names must be non-empty strings, got {t!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tasks
        self.check_finite = check_finite
        # Number of completed steps (int64 scalar). Counter-based randomness derives from it.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def takes_task_gradients(self) -> bool:
        """Whether :meth:`backward` computes the per-task gradients itself (MGDA, PCGrad, ...)
        instead of one ordinary backward pass. Under DDP, run such a step's forward pass under
        ``model.no_sync()``: the engine averages what it computes over the ranks, and DDP's
        own hooks, which no ordinary backward pass would reach, must not wait for one."""
        return self.requires in ("gramian", "block_gramian", "jacobian")

    def _apply(self, fn: Any, recurse: bool = True) -> Balancer:
        # The step counter stays on the host whatever the device of the other state: it seeds
        # counter-based randomness (``_rng``), and reading a CUDA counter would sync each step.
        step = self.step
        super()._apply(fn, recurse)
        self._buffers["step"] = step
        return self

    # ------------------------------------------------------------------ public API
    def backward(
        self,
        losses: Losses,
        *,
        shared: Iterable[Tensor] | None = None,
        features: Tensor | None = None,
        **context: Any,
    ) -> BalanceStep:
        """Combine the task losses and accumulate the update into ``.grad`` of the parameters.

        Args:
            losses: task name -> scalar loss (or a sequence in task order).
            shared: the shared parameters; required by gradient-based balancers.
            features: the last shared representation (for ``grad_on="features"``).
            **context: per-step inputs some methods need (see ``context_keys``).

        Returns:
            A :class:`BalanceStep` with the effective task weights.

        Parameters reached from the losses but not listed in ``shared`` receive the sum of the
        task gradients that reach them: for a head, exactly its own task's gradient.

        The step is validated completely before any state changes, so a rejected step leaves the
        balancer exactly as it was.
        """
        items = self._loss_list(losses)
        self._check_context(context)
        stacked = torch.stack(items)
        values = self._loss_values(stacked)
        if self.requires == "losses":
            out = self._backward_losses(stacked, values, context)
        elif self.requires == "last_shared":
            out = self._backward_last_shared(stacked, values, items, shared, context)
        else:
            out = self._backward_gradients(values, items, shared, features, context)
        self.step += 1
        return out

    def after_step(self, losses: Losses) -> None:
        """Look at the losses after the optimiser step (only methods with ``needs_after_step``)."""
        if self.needs_after_step:
            self._after_step(self._check_losses(losses, need_grad=False))

    def new_epoch(self) -> None:
        """Mark an epoch boundary (used by per-epoch methods such as DWA and LBTW)."""

    # ------------------------------------------------------------------ hooks
    def _loss_weights(self, losses: Tensor, context: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def _objective(
        self, losses: Tensor, values: Tensor, context: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """(scalar to backpropagate, effective weights). Default: ``sum_k w_k L_k`` with the
        weights of :meth:`_loss_weights` from the loss values, treated as constants.

        ``losses`` are this process's (differentiable); ``values`` the whole batch's, detached
        (the mean over the ranks under ``torch.distributed``): weights must come from them."""
        with torch.no_grad():
            weights = self._loss_weights(values, context).to(losses.dtype)
        return (weights * losses).sum(), weights

    def _last_shared_objective(
        self, losses: Tensor, values: Tensor, grads: list[Tensor], context: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """(scalar to backpropagate, effective weights), given the loss values (as in
        :meth:`_objective`) and the per-task gradients of the last shared layer (blocks of
        shape (K, *shape), detached)."""
        raise NotImplementedError

    def _select_last_shared(self, shared: list[Tensor]) -> list[Tensor]:
        """The tensors of ``shared`` that form the last shared layer (``"last_shared"``)."""
        raise NotImplementedError

    def _gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def _block_weights(self, gramians: Tensor, losses: Tensor) -> Tensor:
        """Per-block weights (B, K) from the per-block Gram matrices (B, K, K)."""
        raise NotImplementedError

    def _transform_losses(
        self, losses: list[Tensor], values: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """(losses to differentiate, detached d transformed / d loss per task, shape (K,)).

        Gradient methods differentiate the transformed losses; the second tensor converts
        their weights into effective weights on the original task gradients. Each transformed
        loss must depend on its own task's loss only (so that a backward pass from it does not
        traverse the other tasks' heads), and a nonlinear transform must take its slope from
        ``values`` (the whole batch's losses), so that the ranks' gradients average to the
        whole batch's. Default: identity.
        """
        return losses, torch.ones(len(losses), device=losses[0].device)

    def _aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Return (combined shared gradient of shape (P,), effective weights (K,))."""
        raise NotImplementedError

    def _after_step(self, losses: Tensor) -> None:
        pass

    #: For gradient methods: where per-task gradients are taken (set by subclasses' __init__).
    grad_on: GradOn = "parameters"
    strategy: Strategy = "auto"
    chunk_size: int | None = None

    # ------------------------------------------------------------------ internals
    def _backward_losses(
        self, losses: Tensor, values: Tensor, context: Mapping[str, Any]
    ) -> BalanceStep:
        total, weights = self._objective(losses, values, context)
        total.backward()
        # The model's gradients are DDP's to average; the balancer's own (learned weights)
        # are not part of the model.
        own = [p for p in self.parameters() if p.grad is not None]
        for p, g in zip(own, all_mean_list([p.grad for p in own])):
            p.grad = g
        return BalanceStep(self.tasks, all_mean(total.detach()), weights.detach())

    def _shared_list(self, shared: Iterable[Tensor] | None) -> list[Tensor]:
        if shared is None:
            raise ValueError(
                f"{type(self).__name__} uses per-task gradients: pass shared=<the shared "
                "parameters> to backward()"
            )
        out = [p for p in shared if p.requires_grad]
        if not out:
            raise ValueError("shared contains no parameter that requires grad")
        return out

    def _backward_last_shared(
        self,
        losses: Tensor,
        values: Tensor,
        items: list[Tensor],
        shared: Iterable[Tensor] | None,
        context: Mapping[str, Any],
    ) -> BalanceStep:
        layer = self._select_last_shared(self._shared_list(shared))
        # One vectorised backward from the K losses down to the last shared layer only (heads
        # and that layer); the graph is kept for the single full backward below.
        grads = [g.detach() for g in task_jacobian(items, layer)]
        total, weights = self._last_shared_objective(losses, values, grads, context)
        total.backward()
        return BalanceStep(self.tasks, all_mean(total.detach()), weights.detach())

    def _backward_gradients(
        self,
        values: Tensor,
        items: list[Tensor],
        shared: Iterable[Tensor] | None,
        features: Tensor | None,
        context: Mapping[str, Any],
    ) -> BalanceStep:
        shared = self._shared_list(shared)
        if self.grad_on == "features" and features is None:
            raise ValueError(
                f"{type(self).__name__}(grad_on='features') needs features=<the last shared "
                "representation> in backward()"
            )
        # The engine gets the task losses themselves, not views of the stacked tensor: a
        # backward pass from one of them must not traverse every task's head.
        transformed, factor = self._transform_losses(items, values)
        grads: TaskGradients = task_gradients(
            transformed,
            shared,
            features,
            grad_on=self.grad_on,
            strategy=self.strategy,
            chunk_size=self.chunk_size,
            need_jacobian=self.requires in ("jacobian", "block_gramian"),
        )
        detached = values
        with torch.no_grad():
            if self.requires == "jacobian":
                combined, weights = self._aggregate(grads.jacobian_matrix(), detached)
                grads.apply_vector(combined)
            elif self.requires == "block_gramian":
                blocks = grads.block_gramians
                per_block = self._block_weights(blocks, detached).to(blocks.dtype)
                grads.apply_block_weights(per_block)
                weights = _blend_block_weights(per_block, blocks)
            else:
                weights = self._gramian_weights(grads.gramian, detached).to(grads.gramian.dtype)
                grads.apply_weights(weights)
            factor = factor.to(device=weights.device, dtype=weights.dtype)
            weights = (weights.detach() * factor).to(values.dtype)
        return BalanceStep(self.tasks, (weights * detached).sum(), weights, grads.gramian)

    def _check_losses(self, losses: Losses, need_grad: bool = True) -> Tensor:
        """Validate the losses; their values in task order (see :meth:`_loss_values`)."""
        return self._loss_values(torch.stack(self._loss_list(losses, need_grad)))

    def _loss_list(self, losses: Losses, need_grad: bool = True) -> list[Tensor]:
        """Validate the losses; return them in task order as 0-d tensors."""
        if isinstance(losses, Mapping):
            unknown = [k for k in losses if k not in self.tasks]
            missing = [t for t in self.tasks if t not in losses]
            if unknown:
                raise KeyError(f"unknown task(s) {unknown}; this balancer has tasks {list(self.tasks)}")
            if missing:
                raise KeyError(f"missing loss for task(s) {missing}")
            items = [(t, losses[t]) for t in self.tasks]
        elif isinstance(losses, Sequence) and not isinstance(losses, (str, Tensor)):
            if len(losses) != self.num_tasks:
                raise ValueError(
                    f"got {len(losses)} losses for {self.num_tasks} tasks {list(self.tasks)}"
                )
            items = list(zip(self.tasks, losses))
        else:
            raise TypeError(
                f"losses must be a mapping task -> scalar tensor or a sequence, got {type(losses)}"
            )
        for task, loss in items:
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of task {task!r} is a {type(loss).__name__}, not a Tensor")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss of task {task!r} must be a scalar, got shape {tuple(loss.shape)} "
                    "(reduce it, e.g. with .mean())"
                )
            if need_grad and not loss.requires_grad:
                raise ValueError(
                    f"loss of task {task!r} does not require grad: it is not connected to any "
                    "trainable parameter (was it computed under torch.no_grad() or detached?)"
                )
        # A 0-d loss is used as it is: a reshape would add one view node per task to the
        # graph, and a backward pass through K of them (measured at K=40: ~0.5 ms a step).
        return [loss if loss.dim() == 0 else loss.reshape(()) for _, loss in items]

    def _loss_values(self, stacked: Tensor) -> Tensor:
        """The whole batch's loss values, detached: the mean over the ranks under
        ``torch.distributed`` (so every rank computes the same weights), checked for finiteness
        (after the mean, so that every rank raises together)."""
        values = all_mean(stacked.detach())
        if self.check_finite:
            finite = torch.isfinite(values)
            if not bool(finite.all()):  # one host sync, opt out with check_finite=False
                bad = [t for t, ok in zip(self.tasks, finite.tolist()) if not ok]
                raise FloatingPointError(f"non-finite loss for task(s) {bad}: {values.tolist()}")
        return values

    def _check_context(self, context: Mapping[str, Any]) -> None:
        unknown = [k for k in context if k not in self.context_keys]
        if unknown:
            accepted = list(self.context_keys) or "none"
            raise TypeError(
                f"{type(self).__name__}.backward() got unexpected context {unknown}; "
                f"it accepts: {accepted}"
            )
        self._validate_context(context)

    def _validate_context(self, context: Mapping[str, Any]) -> None:
        """Raise on bad context before any state changes (override where context is used)."""

    def _task_values(self, values: Mapping[str, float] | float, what: str) -> Tensor:
        """A per-task hyperparameter given as one number or a task -> number mapping."""
        if isinstance(values, Mapping):
            unknown = [k for k in values if k not in self.tasks]
            missing = [t for t in self.tasks if t not in values]
            if unknown or missing:
                raise ValueError(
                    f"{what} must give a value for exactly the tasks {list(self.tasks)}; "
                    f"unknown {unknown}, missing {missing}"
                )
            out = [float(values[t]) for t in self.tasks]
        else:
            out = [float(values)] * self.num_tasks
        for t, v in zip(self.tasks, out):
            if not math.isfinite(v):
                raise ValueError(f"{what} for task {t!r} must be finite, got {v}")
        return torch.tensor(out, dtype=torch.float32)

    def _rng(self, salt: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A generator derived from (seed, step): reproducible, and exact on resume with no
        generator state to save. ``device`` places it (draws on a CUDA tensor's device need a
        CUDA generator; the streams of different devices differ)."""
        seed = int(getattr(self, "seed", 0))
        gen = torch.Generator() if device is None else torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + int(self.step) * 7919 + salt) % (2**63 - 1))
        return gen

    def __str__(self) -> str:
        return self.name or type(self).__name__


class GradientBalancer(Balancer):
    """Base of the balancers that combine per-task gradients (``requires`` is ``"gramian"`` or
    ``"jacobian"``).

    Args:
        tasks: task names.
        grad_on: ``"parameters"`` (exact: gradients of the shared parameters) or ``"features"``
            (cheap: gradients of the shared representation, as MGDA-UB; pass ``features=`` to
            :meth:`backward`).
        strategy: how the engine runs the K backward passes: ``"auto"``, ``"batched"``, ``"loop"``.
        chunk_size: at most this many tasks per batched backward (bounds memory).
        check_finite: raise on a non-finite loss.
    """

    requires: ClassVar[Requirement] = "gramian"

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        grad_on: GradOn = "parameters",
        strategy: Strategy = "auto",
        chunk_size: int | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(tasks, check_finite=check_finite)
        if grad_on not in GRAD_ON:
            raise ValueError(f"grad_on must be one of {GRAD_ON}, got {grad_on!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.grad_on = grad_on
        self.strategy = strategy
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"grad_on={self.grad_on!r}, strategy={self.strategy!r}"


def _blend_block_weights(per_block: Tensor, gramians: Tensor) -> Tensor:
    """One effective weight per task from per-block weights (B, K): the blocks' weights averaged
    in proportion to the task's squared gradient norm in each block (exact when all blocks
    agree); the plain mean for a task whose gradient is zero everywhere."""
    sq = gramians.diagonal(dim1=1, dim2=2)  # (B, K)
    total = sq.sum(0)
    blended = (per_block * sq).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, blended, per_block.mean(0))


def positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a hyperparameter that must be positive (or non-negative)."""
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value
