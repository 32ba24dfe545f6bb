"""The balancer contract: a method is one small class with one hook.

A balancer is an :class:`torch.nn.Module` whose state (loss histories, learned parameters,
inner optimiser moments) is registered as buffers or parameters, so ``state_dict()`` /
``load_state_dict()`` round-trip exactly and a resumed run follows the same trajectory. The
state also records the task names: loading state saved for other tasks (or another order) is an
error, never a silent mapping by position.

A method subclasses one of five bases and implements its one hook; what the engine computes
follows from the base (the read-only ``requires`` is derived from it, for the trainer and the
benchmarks):

==========================  ===================================================  ===============
base                        hook (all inputs detached)                           ``requires``
==========================  ===================================================  ===============
:class:`LossWeighting`      ``loss_weights(values, context) -> (K,)`` on the    ``losses``
                            host in Python floats; learned weights implement
                            ``learned_weights(values) -> (weights, r, grads)``
                            or ``objective(losses, values, context) -> (total,
                            weights)`` instead
:class:`LastLayerWeighting` ``layer_objective(losses, values, layer_grads,       ``last_shared``
                            context) -> (total, weights)``
:class:`GramianWeighting`   ``gramian_weights(gramian (K, K), losses) -> (K,)``  ``gramian``
:class:`BlockGramianWeighting` ``block_weights(gramians (B, K, K), losses)       ``block_gramian``
                            -> (B, K)``
:class:`JacobianAggregator` ``aggregate(jacobian (K, P), losses) -> (vector      ``jacobian``
                            (P,), weights (K,))``
==========================  ===================================================  ===============

The four gradient bases derive from :class:`GradientBalancer`, the only place of the engine
options (``grad_on``, ``strategy``, ``chunk_size``, ``check_finite``); a method takes its own
hyperparameters and passes the rest on::

    @register("my_method")
    class MyMethod(GramianWeighting):
        def __init__(self, tasks, *, alpha: float = 0.5, **options):
            super().__init__(tasks, **options)
            self.alpha = positive("alpha", alpha)

        def gramian_weights(self, gramian, losses):
            ...

``create("my_method", tasks, alpha=1, grad_on="features")`` then accepts every engine option and
rejects any other keyword, listing the accepted ones. A class whose hook is missing cannot be
registered or built. ``docs/contract.md`` has a complete example; every registered method is
covered by the contract and property tests (``tests/balancers/test_balancer_contract.py``) unless that
file lists it as an exception, with the reason.

Gramian hooks receive the Gram matrix in float64 (the engine computes it at a safe scale, so it
is finite for every finite gradient, however large or small); ``losses`` are the loss values
(the means over the ranks under ``torch.distributed``). Gradient methods may also transform the
losses before differentiating them (:meth:`GradientBalancer.transform_losses`, e.g. DB-MTL's
log-loss); effective weights are then reported with respect to the gradients of the original
losses.

**What the task-specific parameters (heads) receive**, exactly:

* loss weightings (:class:`LossWeighting`, :class:`LastLayerWeighting`): the one backward pass
  of ``sum_k w_k L_k`` gives the parameters of task k's head ``w_k * grad L_k`` (the weighted
  gradient, as in the papers and LibMTL);
* gradient methods (the four :class:`GradientBalancer` bases): the plain gradient of their own
  task's loss, ``grad L_k``, whatever the weights of the shared update (for a method with
  :meth:`~GradientBalancer.transform_losses`, of the transformed loss: e.g. ``grad L_k / L_k``
  for DB-MTL, ``e^{s_k} grad L_k`` for IMTL-L).

A parameter listed in ``shared`` receives the combined update; listing one twice is an error.

**One step** (:meth:`Balancer.backward`) runs in phases: validate every input (no state changes
before this is done, so a rejected step leaves the balancer as it was); compute (the engine's
gradients, the hook's weights); write the update into ``.grad``; commit (advance the step
counter). Hooks update their own running state while computing.

Under ``torch.distributed`` the hooks see the whole batch: the loss values they get are the
means over the ranks, the engine averages the per-task gradients, and the balancer's own
parameters' gradients are averaged after the backward pass, so every rank computes the same
weights (``tests/engine/test_dist.py``). In one process no collective is called.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
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
from mtlkit.engine._dist import all_mean, all_mean_list, world_size

# The autograd engine's entry point behind torch.autograd.backward (torch >= 2.3; private, but
# it forwards to the engine's run_backward, whose arguments have not changed since torch 1.x:
# a change would be a TypeError raised before any gradient is written, never a silent one).
try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - a torch without it takes the public call
    _engine_run_backward = None
from mtlkit.balancers._functional import host_view
from mtlkit.engine._fsdp import is_sharded
from mtlkit.engine._grads import _task_leaves

#: Steps per block of random draws made on the host (see :meth:`Balancer._host_draws`).
DRAW_BLOCK = 64

#: The ``array`` type code of a torch dtype, where it has one (the cheapest way from Python floats
#: to a CPU tensor: ``torch.frombuffer`` of an ``array.array``).
_ARRAY_CODES = {torch.float64: "d", torch.float32: "f"}

Requirement = Literal["losses", "last_shared", "gramian", "block_gramian", "jacobian"]
Losses = Mapping[str, Tensor] | Sequence[Tensor]


class BalanceStep:
    """What one :meth:`Balancer.backward` call did.

    The tensors stay on the device; the dict views (``weights``) synchronise with the host only
    when read, so logging them is the caller's choice.

    Attributes:
        tasks: task names, in the balancer's order.
        loss: the detached scalar ``sum_k w_k L_k`` whose gradient the shared parameters received
            (for learned balancers, plus their regulariser). May be given as a function of no
            arguments, computed when first read (a loss weighting's step costs no operation for
            a value nobody reads).
        weight_tensor: effective weight of each task's gradient in the shared update, shape (K,).
            May be given as a function of no arguments, made when first read.
        gramian: the K x K Gram matrix of the task gradients (float64), for gradient methods;
            else None.
    """

    # A plain class with slots, not a dataclass: built every step (see the tiny suite of the
    # speed benchmark, where a frozen dataclass's construction was a visible share).
    __slots__ = ("_loss", "_weight_tensor", "extras", "gramian", "tasks")

    def __init__(self, tasks: tuple[str, ...], loss: Tensor | Callable[[], Tensor],
                 weight_tensor: Tensor | Callable[[], Tensor], gramian: Tensor | None = None,
                 extras: dict[str, Tensor] | None = None) -> None:
        self.tasks = tasks
        self._loss = loss
        self._weight_tensor = weight_tensor
        self.gramian = gramian
        self.extras: dict[str, Tensor] = {} if extras is None else extras

    @property
    def weight_tensor(self) -> Tensor:
        """Effective weight of each task's gradient in the shared update, shape (K,)."""
        weights = self._weight_tensor
        if not isinstance(weights, Tensor):
            weights = self._weight_tensor = weights()
        return weights

    @property
    def loss(self) -> Tensor:
        """The detached scalar whose gradient the shared parameters received."""
        loss = self._loss
        if not isinstance(loss, Tensor):
            loss = self._loss = loss()
        return loss

    def __repr__(self) -> str:
        return (f"BalanceStep(tasks={self.tasks}, loss={self.loss}, "
                f"weight_tensor={self.weight_tensor}, gramian={self.gramian})")

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


def _encode_tasks(tasks: Sequence[str]) -> Tensor:
    """The task names as bytes (NUL-separated UTF-8) in a uint8 tensor: state, so that loading
    state saved for other tasks can be refused."""
    return torch.tensor(list("\0".join(tasks).encode()), dtype=torch.uint8)


def _decode_tasks(encoded: Tensor) -> list[str]:
    return bytes(encoded.cpu().tolist()).decode().split("\0")


class Balancer(nn.Module):
    """Base class of every balancer: tasks, validation, the step counter and the phases of
    :meth:`backward`. Methods subclass one of the five family bases (see the module docstring),
    never this class directly.

    Args:
        tasks: the task names, in a fixed order (used for weights, state and reports).
        check_finite: raise on a non-finite loss, before any state changes (one host read of
            the K loss values; on CPU a plain read, on an accelerator one synchronisation).
    """

    #: What the engine computes for this family; derived from the base class, not set by methods.
    requires: ClassVar[Requirement]
    #: Keyword context a step accepts (e.g. ``kpi`` for DTP); anything else is an error.
    context_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`after_step` must be called with the post-step losses (FAMO; an instance
    #: may set it from its options).
    needs_after_step: bool = False
    #: Whether a step takes the losses of a second, independent mini-batch (``second_losses``:
    #: MoDo, SDMGrad) or of a held-out batch (``held_out``, ``parameters``: Auto-Lambda); the
    #: trainer draws those batches.
    needs_second_batch: ClassVar[bool] = False
    needs_held_out_batch: ClassVar[bool] = False
    #: Registry name, set by :func:`mtlkit.balancers.register`.
    name: ClassVar[str] = ""
    #: Where per-task gradients are taken; "parameters" for methods that take none (the trainer
    #: reads it to decide whether the model must expose its features).
    grad_on: GradOn = "parameters"
    #: The hook a method of this family implements (checked when a method is built).
    _hooks: ClassVar[tuple[str, ...]] = ()

    step: Tensor
    task_names: Tensor
    #: While a scaled backward runs: the gradient scaler's scale (the losses differentiated are
    #: multiplied by it); None otherwise. Not state.
    _loss_scale: Tensor | None = None
    #: Whether the last backward's gradients were not finite (the scaler skips that step).
    _skipped: bool = False
    #: The number of processes, read once per step by :meth:`backward`. Not state.
    _world: int = 1
    #: The loss values last checked (by :meth:`backward`, :meth:`after_step`) as Python floats
    #: when the finiteness check read them to the host, else None. Not state.
    _host_values: list[float] | None = None
    #: Buffer name -> (memoryview of its memory, the buffer); see :func:`._functional.host_view`.
    _views: dict[str, tuple[memoryview, Tensor]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "requires" in cls.__dict__ and cls.__module__ != __name__:
            raise TypeError(
                f"{cls.__name__} sets requires: it is derived from the base class (subclass "
                "LossWeighting, GramianWeighting, BlockGramianWeighting, JacobianAggregator or "
                "LastLayerWeighting instead)"
            )

    @classmethod
    def missing_hook(cls) -> str | None:
        """The hook this class still has to implement (one of ``_hooks`` overridden below its
        family base), or None when it is complete."""
        if not cls._hooks:
            return (f"{cls.__name__} must subclass LossWeighting, GramianWeighting, "
                    "BlockGramianWeighting, JacobianAggregator or LastLayerWeighting")
        family = next(b for b in cls.__mro__ if b.__dict__.get("_hooks"))
        for klass in cls.__mro__:
            if klass is family:
                break
            if any(h in klass.__dict__ for h in cls._hooks):
                return None
        return f"{cls.__name__} must implement {' or '.join(cls._hooks)}()"

    def __init__(self, tasks: Sequence[str], *, check_finite: bool = True) -> None:
        super().__init__()
        missing = type(self).missing_hook()
        if missing:
            raise TypeError(missing)
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a sequence of task names, got {tasks!r}")
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("tasks must name at least one task")
        for t in tasks:
            if not isinstance(t, str) or not t or "\0" in t:
                raise ValueError(f"task names must be non-empty strings, got {t!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tasks
        self.check_finite = bool(check_finite)
        # Number of completed steps (int64 scalar). Counter-based randomness derives from it.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # The task names, saved with the state and checked when it is loaded.
        self.register_buffer("task_names", _encode_tasks(tasks))

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
        # The step counter and the task names stay on the host whatever the device of the
        # other state: the counter seeds counter-based randomness (``_rng``), and reading a
        # CUDA counter would sync each step.
        kept = {k: self._buffers[k] for k in ("step", "task_names")}
        super()._apply(fn, recurse)
        self._buffers.update(kept)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Caches tied to this object's tensors (memoryviews of buffers, which a copy would
        # detach from the copied buffers) and generators are remade, not copied.
        state = super().__getstate__()
        state.pop("_views", None)
        state.pop("_generators", None)
        return state

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "task_names")
        if saved is not None and not torch.equal(saved.cpu(), self.task_names):
            raise ValueError(
                f"{type(self).__name__}: the state was saved for tasks {_decode_tasks(saved)}, "
                f"but this balancer has tasks {list(self.tasks)} (per-task state would be "
                "mapped to the wrong tasks)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ public API
    def backward(
        self,
        losses: Losses,
        *,
        shared: Iterable[Tensor] | None = None,
        features: Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        **context: Any,
    ) -> BalanceStep:
        """Combine the task losses and accumulate the update into ``.grad`` of the parameters.

        Args:
            losses: task name -> scalar loss (or a sequence in task order).
            shared: the shared parameters; required by the gradient-based families.
            features: the last shared representation (for ``grad_on="features"``).
            scaler: a ``torch.amp.GradScaler`` (fp16 mixed precision). Pass the *unscaled*
                losses, then call ``scaler.step(optimizer); scaler.update()`` as usual. The
                balancer differentiates the scaled losses, computes its weights, norms and Gram
                matrices on unscaled quantities, and writes scaled gradients, which the scaler
                unscales and checks. When those gradients are not finite (the scaler will skip
                the step), the balancer's state is left exactly as it was before this call.
            **context: per-step inputs some methods need (see ``context_keys``).

        Returns:
            A :class:`BalanceStep` with the effective task weights.

        The step is validated completely before any state changes, so a rejected step leaves the
        balancer exactly as it was. What the heads receive depends on the family (module
        docstring).
        """
        items = self._loss_list(losses)
        if context or self.context_keys:
            self._check_context(context)
        stacked = torch.stack(items)
        # _loss_values inlined, with the world size read once per step (this path runs every
        # step; on the tiny suite of the speed benchmark each call and lookup here is visible).
        values = stacked.detach()
        world = world_size()
        self.__dict__["_world"] = world  # (Module.__setattr__ costs more than the read)
        if world > 1:
            values = all_mean(values)
        # (the K values on the host when the check read them there: loss weightings use them)
        self.__dict__["_host_values"] = self._check_finite(values) if self.check_finite else None
        if self._skipped:  # (a module attribute assignment costs more than this read)
            self._skipped = False
        if scaler is None or not scaler.is_enabled():
            out = self._balance(items, stacked, values, shared, features, context)
            self._commit()
            return out
        # The state as it was: restored if the scaler is going to skip this step.
        saved = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self._loss_scale = scaler.scale(torch.ones((), device=values.device))
        try:
            out = self._balance(items, stacked, values, shared, features, context)
        except FloatingPointError:
            # Non-finite gradients made a derived quantity non-finite (e.g. Auto-Lambda's
            # held-out losses after its look-ahead step): restore the state and hand the
            # scaler non-finite gradients, so that it skips this step like any other overflow.
            self.load_state_dict(saved)
            self._skipped = True
            nan = float("nan")
            for p in _task_leaves(items, set(), None).heads:
                p.grad = torch.full_like(p, nan)
            weights = torch.full_like(values, nan)
            return BalanceStep(self.tasks, weights.sum(), weights)
        finally:
            self._loss_scale = None
        if _written_gradients_finite(items, self):
            self._commit()
        else:
            self.load_state_dict(saved)
            self._skipped = True
        return out

    def after_step(self, losses: Losses) -> None:
        """Look at the losses after the optimiser step (only methods with ``needs_after_step``;
        nothing after a step that a gradient scaler skips)."""
        if self.needs_after_step and not self._skipped:
            self._after_step(self._host_loss_values(self._loss_list(losses, need_grad=False)))

    def new_epoch(self) -> None:
        """Mark an epoch boundary (used by per-epoch methods such as DWA and LBTW)."""

    # ------------------------------------------------------------------ phases
    def _balance(self, items: list[Tensor], stacked: Tensor, values: Tensor,
                 shared: Iterable[Tensor] | None, features: Tensor | None,
                 context: Mapping[str, Any]) -> BalanceStep:
        """Compute the update and write it into ``.grad`` (implemented by each family)."""
        raise NotImplementedError

    def _commit(self) -> None:
        """The step is done: advance the counter."""
        host_view(self, "step")[()] += 1

    def _after_step(self, values: list[float]) -> None:
        """The hook of :meth:`after_step`: ``values`` are the K losses after the optimiser step
        as Python floats, the whole batch's (the mean over the ranks under
        ``torch.distributed``), checked finite (unless ``check_finite=False``)."""

    # ------------------------------------------------------------------ validation
    def _check_losses(self, losses: Losses, need_grad: bool = True) -> Tensor:
        """Validate the losses; their values in task order (see :meth:`_loss_values`)."""
        return self._loss_values(torch.stack(self._loss_list(losses, need_grad)))

    def _loss_list(self, losses: Losses, need_grad: bool = True) -> list[Tensor]:
        """Validate the losses; return them in task order as 0-d tensors."""
        # The common case first (a dict of 0-d tensors for exactly the tasks); anything else,
        # valid or not, takes the full checks below, which raise the precise error.
        if type(losses) is dict and len(losses) == len(self.tasks):
            try:
                items = [losses[t] for t in self.tasks]
            except KeyError:
                pass
            else:
                for loss in items:
                    if not (isinstance(loss, Tensor) and loss.dim() == 0
                            and (loss.requires_grad or not need_grad)):
                        break
                else:
                    return items
        return self._loss_list_checked(losses, need_grad)

    def _loss_list_checked(self, losses: Losses, need_grad: bool) -> list[Tensor]:
        if isinstance(losses, Mapping):
            if len(losses) != len(self.tasks) or any(t not in losses for t in self.tasks):
                unknown = [k for k in losses if k not in self.tasks]
                missing = [t for t in self.tasks if t not in losses]
                if unknown:
                    raise KeyError(
                        f"unknown task(s) {unknown}; this balancer has tasks {list(self.tasks)}")
                raise KeyError(f"missing loss for task(s) {missing}")
            items = [losses[t] for t in self.tasks]
        elif isinstance(losses, Sequence) and not isinstance(losses, (str, Tensor)):
            if len(losses) != self.num_tasks:
                raise ValueError(
                    f"got {len(losses)} losses for {self.num_tasks} tasks {list(self.tasks)}"
                )
            items = list(losses)
        else:
            raise TypeError(
                f"losses must be a mapping task -> scalar tensor or a sequence, got {type(losses)}"
            )
        out = []
        for task, loss in zip(self.tasks, items):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of task {task!r} is a {type(loss).__name__}, not a Tensor")
            if loss.dim():
                if loss.numel() != 1:
                    raise ValueError(
                        f"loss of task {task!r} must be a scalar, got shape {tuple(loss.shape)} "
                        "(reduce it, e.g. with .mean())"
                    )
                # A 0-d loss is used as it is: a reshape adds one view node per task to the
                # graph (measured at K=40: ~0.5 ms a step).
                loss = loss.reshape(())
            if need_grad and not loss.requires_grad:
                raise ValueError(
                    f"loss of task {task!r} does not require grad: it is not connected to any "
                    "trainable parameter (was it computed under torch.no_grad() or detached?)"
                )
            out.append(loss)
        return out

    def _loss_values(self, stacked: Tensor) -> Tensor:
        """The whole batch's loss values, detached: the mean over the ranks under
        ``torch.distributed`` (so every rank computes the same weights), checked for finiteness
        (after the mean, so that every rank raises together). Sets ``_host_values``."""
        values = stacked.detach() if stacked.requires_grad else stacked
        if world_size() > 1:
            values = all_mean(values)
        self.__dict__["_host_values"] = self._check_finite(values) if self.check_finite else None
        return values

    def _host_loss_values(self, items: list[Tensor]) -> list[float]:
        """The values of the 0-d losses ``items`` as Python floats, the whole batch's (the mean
        over the ranks under ``torch.distributed``), checked finite."""
        if len(items) <= 8 and items[0].is_cpu and world_size() == 1:
            # (a read per loss costs less than stacking a few: this runs every step; a 0-d
            # tensor's tolist() is its item() without the dispatcher)
            host = [x.tolist() for x in items]
            return self._check_host_finite(host) if self.check_finite else host
        values = self._loss_values(torch.stack(items))
        host = self._host_values
        return values.tolist() if host is None else host

    def _check_finite(self, values: Tensor) -> list[float] | None:
        """Raise on a non-finite value, naming the tasks; the values as Python floats when they
        were read to the host (on CPU), else None."""
        # On the host the K values are read directly (a list read costs less than one torch
        # operation); on an accelerator one reduction and one synchronisation.
        if not values.is_cpu and bool(torch.isfinite(values).all()):
            return None
        return self._check_host_finite(values.tolist())

    def _check_host_finite(self, host: list[float]) -> list[float]:
        """Raise on a non-finite value of the K loss values ``host``, naming the tasks; else
        return them."""
        # The sum first: finite when every value is (a non-finite or overflowing sum takes the
        # per-task check).
        if not math.isfinite(sum(host)) and not all(map(math.isfinite, host)):
            bad = [t for t, v in zip(self.tasks, host) if not math.isfinite(v)]
            raise FloatingPointError(f"non-finite loss for task(s) {bad}: {host}")
        return host

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

    def _shared_list(self, shared: Iterable[Tensor] | None) -> list[Tensor]:
        if shared is None:
            raise ValueError(
                f"{type(self).__name__} uses per-task gradients: pass shared=<the shared "
                "parameters> to backward()"
            )
        out = [p for p in shared if p.requires_grad]
        if not out:
            raise ValueError("shared contains no parameter that requires grad")
        if len({id(p) for p in out}) != len(out):
            seen: set[int] = set()
            dup = next(i for i, p in enumerate(out) if id(p) in seen or seen.add(id(p)))
            raise ValueError(
                f"shared lists a parameter twice (position {dup}, shape "
                f"{tuple(out[dup].shape)}): its update would be counted twice"
            )
        return out

    # ------------------------------------------------------------------ helpers for methods
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

    def _rng(self, salt: int = 0, device: torch.device | str | None = None,
             counter: int | None = None) -> torch.Generator:
        """A generator derived from (seed, step): reproducible, and exact on resume with no
        generator state to save. ``device`` places it (draws on a CUDA tensor's device need a
        CUDA generator; the streams of different devices differ); ``counter`` replaces the
        step (see :meth:`_host_draws`)."""
        seed = int(getattr(self, "seed", 0))
        # One generator per device, re-seeded at each call (creating one costs more than the
        # draw it serves): the stream depends only on the seed set here.
        gens = self.__dict__.setdefault("_generators", {})
        key = None if device is None else str(device)
        gen = gens.get(key)
        if gen is None:
            gen = gens[key] = torch.Generator() if device is None else torch.Generator(device=device)
        if counter is None:
            counter = host_view(self, "step")[()]
        gen.manual_seed((seed * 1_000_003 + counter * 7919 + salt) % (2**63 - 1))
        return gen

    def _host_draws(self, step: int, draw: Callable[[torch.Generator, int], Tensor]
                    ) -> list[float]:
        """Row ``step`` of random draws made on the host ``DRAW_BLOCK`` steps at a time:
        ``draw(generator, n)`` returns n rows, from a generator seeded by (seed, step //
        DRAW_BLOCK), so a run draws the same rows whatever step it starts or resumes at.
        (Seeding a generator and drawing cost ~30 us inside a training step, as much as a
        small model's whole budget for its loss weighting; a row of a block costs nothing.)"""
        block, row = divmod(step, DRAW_BLOCK)
        cached = self.__dict__.get("_draw_block")
        if cached is None or cached[0] != block:
            rows = draw(self._rng(counter=block), DRAW_BLOCK).tolist()
            cached = self.__dict__["_draw_block"] = (block, rows)
        return cached[1][row]

    def __str__(self) -> str:
        return self.name or type(self).__name__


# ---------------------------------------------------------------------- loss weightings
class LossWeighting(Balancer):
    """Weights from the loss values; the update is one backward pass of ``sum_k w_k L_k``, like
    a plain sum. The heads receive ``w_k grad L_k``.

    Hooks (a method implements one):

    * :meth:`loss_weights` for weights that are constants of the backward pass: K numbers in,
      K numbers out, on the host as Python floats. The loss values are read to the host once
      per step (on an accelerator, the step's one synchronisation, which the finiteness check
      needs anyway); the weights travel back once. Inside a training step, where the model's
      own work keeps the caches cold, a torch or a NumPy operation on K numbers costs about
      4 us and a Python float operation next to nothing (measured on the tiny suite of the
      speed benchmark): on a small model that difference is the method's whole overhead over
      a plain sum. The method's running state is kept in buffers that stay on the host
      whatever the device of the balancer (read and written through
      :func:`~mtlkit.balancers._functional.host_view`).
    * :meth:`learned_weights` for weights that are functions of the balancer's own parameters,
      learned from the same backward pass (uncertainty weighting, IMTL-L): the weights and the
      closed-form gradient of the objective in those parameters.
    * :meth:`objective` for anything else differentiable (bilevel methods): the scalar to
      backpropagate and the effective weights.
    """

    requires: ClassVar[Requirement] = "losses"
    _hooks = ("loss_weights", "learned_weights", "objective")
    #: Whether :meth:`loss_weights` reads the loss values (False: it receives None and the
    #: values are not read to the host, e.g. equal or fixed weights).
    reads_values: ClassVar[bool] = True

    def loss_weights(self, values: list[float] | None, context: Mapping[str, Any]) -> Any:
        """The K weights (a list of floats, or a NumPy array) from the K loss values: Python
        floats, the whole batch's (the means over the ranks under ``torch.distributed``), None
        when the class sets ``reads_values = False``.

        A method whose weights stay the same returns ``self._constant(make)`` (the same
        read-only array each step, remade after a state load): it is sent to the device once."""
        raise NotImplementedError

    def learned_weights(self, values: Tensor
                        ) -> tuple[Tensor, Tensor | Callable[[], Tensor], list[Tensor]]:
        """(weights (K,), regulariser, gradients) for weights that are functions of the
        balancer's own parameters, learned from the same backward pass of the objective
        ``sum_k w_k L_k + r``: the weights and ``r`` from the current parameters (detached;
        ``r`` a 0-d tensor or a function of no arguments that computes it when first read),
        and the gradient of the objective (new tensors) in each parameter registered on the
        balancer itself (``self._parameters``, in that order) at the loss values ``values``
        (detached; the whole batch's). The model receives
        ``sum_k w_k grad L_k`` from one backward pass; the balancer's parameters receive the
        returned gradients (accumulated into ``.grad``)."""
        raise NotImplementedError

    def objective(self, losses: Tensor, values: Tensor, context: Mapping[str, Any]
                  ) -> tuple[Tensor, Tensor]:
        """(scalar to backpropagate, effective weights (K,)), for weights that need autograd.

        ``losses`` are this process's (stacked, differentiable); ``values`` the whole batch's,
        detached: weights must come from them. The weights may be differentiable in the
        balancer's own parameters (their gradients are averaged over the ranks afterwards)."""
        raise NotImplementedError

    #: Which hook the class implements ("loss_weights", "learned_weights" or "objective"),
    #: set for each subclass.
    _hook: ClassVar[str] = "loss_weights"
    #: (array the hook returned, its tensor): a read-only array returned again is not converted
    #: again. Not state.
    _weights_cache: tuple[Any, Tensor] | None = None
    #: The dtype of the losses of the step being computed (set before :meth:`loss_weights` is
    #: called, which receives Python floats whatever the losses' dtype: for safeguards that
    #: depend on it, e.g. a floor that keeps a weight finite in that dtype). Not state.
    _loss_dtype: torch.dtype = torch.float64

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hook = next((h for h in ("objective", "learned_weights")
                          if getattr(cls, h) is not getattr(LossWeighting, h)), "loss_weights")

    def _constant(self, make: Callable[[], Any]) -> np.ndarray:
        """``frozen(make())``, made at the first call and again after a state load: for weights
        that change only with the state (the tensor sent to the device is then reused)."""
        weights = self._constant_weights
        if weights is None:
            weights = self.__dict__["_constant_weights"] = frozen(make())
        return weights

    #: The weights of :meth:`_constant` (dropped when the state is loaded). Not state.
    _constant_weights: np.ndarray | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_constant_weights"] = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> LossWeighting:
        # The state of host weights (buffers of this module and its submodules) stays on the
        # host in its own dtype whatever the device or dtype the balancer is moved to.
        if self._hook != "loss_weights" or type(self)._balance is not LossWeighting._balance:
            return super()._apply(fn, recurse)
        kept = [(m, dict(m._buffers)) for m in self.modules()]
        super()._apply(fn, recurse)
        for module, buffers in kept:
            module._buffers.update(buffers)
        return self

    def _balance(self, items: list[Tensor], stacked: Tensor, values: Tensor,
                 shared: Iterable[Tensor] | None, features: Tensor | None,
                 context: Mapping[str, Any]) -> BalanceStep:
        hook = self._hook
        if hook == "objective":
            total, weights = self.objective(stacked, values, context)
            return self._backward_total(total, weights)
        # The objective sum_k w_k L_k (+ r) with constant weights: its gradient in the model is
        # the backward pass of the stacked losses seeded with the weights (no product node, no
        # graph root of its own); its value is values @ weights (+ r), the whole batch's under
        # torch.distributed. The seed is a tensor nobody else holds: autograd may hand its
        # memory to a leaf as that leaf's .grad (a 0-d parameter added to a loss), which
        # optimiser code then changes in place (clipping, unscaling, zeroing).
        scale = self._loss_scale
        weights: Tensor | _HostWeights
        if hook == "learned_weights":
            weights, regulariser, grads = self.learned_weights(values)
            self._accumulate_own(grads)
            if weights.dtype != stacked.dtype:
                weights = weights.to(stacked.dtype)
            seed = weights.clone() if scale is None else weights * scale
        else:
            # Host maths: the values as Python floats, read once per step (by the finiteness
            # check when it ran on the host).
            host = None
            if self.reads_values:
                host = self._host_values
                if host is None:
                    host = values.tolist()
            self.__dict__["_loss_dtype"] = stacked.dtype  # (cheaper than Module.__setattr__)
            weights, seed = self._weights_tensors(self.loss_weights(host, context), stacked)
            if scale is not None:
                seed = seed * scale
            regulariser = None
        _seeded_backward(stacked, seed)
        if type(weights) is _HostWeights:
            read = weights
            loss: Callable[[], Tensor] = lambda: values @ read()
        else:
            loss = lambda: values @ weights
        if regulariser is not None:
            value = loss
            loss = lambda: value() + (
                regulariser() if callable(regulariser) else regulariser)
        return BalanceStep(self.tasks, loss, weights)

    def _weights_tensors(self, weights: Any, like: Tensor
                         ) -> tuple[Tensor | _HostWeights, Tensor]:
        """(the step's weights: a tensor, or a :class:`_HostWeights` that makes one when read;
        the seed of the backward pass: a new tensor) from the hook's K weights, in the losses'
        dtype and device."""
        cached = self._weights_cache
        if (cached is not None and cached[0] is weights and cached[1].dtype == like.dtype
                and cached[1].device == like.device):
            return cached[1], cached[1].clone()
        # A list is copied (it may be the method's state), an array converted (it may be a view
        # of the method's state); on the host through array.array, a fifth of torch.tensor's
        # cost, else made on the device in one call.
        listed = tuple(weights) if type(weights) is list else np.asarray(weights, np.float64).tolist()
        code = _ARRAY_CODES.get(like.dtype) if like.is_cpu else None
        try:
            packed = None if code is None else array(code, listed)
        except TypeError:  # not K floats: made below, and its shape named
            packed = None
        if packed is None:
            seed = torch.tensor(listed, dtype=like.dtype, device=like.device)
        else:
            seed = torch.frombuffer(packed, dtype=like.dtype)
        if seed.shape != like.shape:
            raise ValueError(f"{type(self).__name__}.loss_weights returned shape "
                             f"{tuple(seed.shape)}; expected {tuple(like.shape)}")
        if type(weights) is np.ndarray and not weights.flags.writeable:
            kept = seed.clone()
            self.__dict__["_weights_cache"] = (weights, kept)
            return kept, seed
        return _HostWeights(listed, like), seed

    def _accumulate_own(self, grads: Sequence[Tensor]) -> None:
        """Add the gradients of the balancer's own parameters (times the loss scale of a
        gradient scaler, as a backward pass of the scaled objective would)."""
        scale = self._loss_scale
        for p, g in zip(self._parameters.values(), grads, strict=True):
            if scale is not None:
                g = g * scale
            if p.grad is None:  # type: ignore[union-attr]
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)  # type: ignore[union-attr]
            else:
                p.grad.add_(g)  # type: ignore[union-attr]

    def _backward_total(self, total: Tensor, weights: Tensor) -> BalanceStep:
        scale = self._loss_scale
        (total if scale is None else total * scale).backward()
        total = total.detach()
        if self._world > 1:
            # The model's gradients are DDP's to average; the balancer's own (learned weights)
            # are not part of the model.
            own = [p for p in self.parameters() if p.grad is not None]
            for p, g in zip(own, all_mean_list([p.grad for p in own])):
                p.grad = g
            total = all_mean(total)
        return BalanceStep(self.tasks, total,
                           weights.detach() if weights.requires_grad else weights)


class LastLayerWeighting(LossWeighting):
    """Weights from the loss values and the per-task gradients of the last shared layer (e.g.
    GradNorm); the update is then one backward pass of the returned objective, as for
    :class:`LossWeighting` (heads receive ``w_k grad L_k``). ``shared`` must be passed.

    Hook: :meth:`layer_objective`; :meth:`select_layer` chooses the layer (default: the
    trailing tensors of ``shared`` from its last tensor with two or more dimensions).
    """

    requires: ClassVar[Requirement] = "last_shared"
    _hooks = ("layer_objective",)

    def layer_objective(self, losses: Tensor, values: Tensor, layer_grads: list[Tensor],
                        context: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(scalar to backpropagate, effective weights), given the loss values (as in
        :meth:`LossWeighting.objective`) and the per-task gradients of the layer (blocks of
        shape (K, *shape), detached)."""
        raise NotImplementedError

    def select_layer(self, shared: list[Tensor]) -> list[Tensor]:
        """The tensors of ``shared`` that form the last shared layer: from the last tensor with
        two or more dimensions (a weight matrix or kernel) to the end (its bias, a following
        norm layer's affine parameters); all of ``shared`` when none has two dimensions."""
        matrices = [i for i, p in enumerate(shared) if p.dim() >= 2]
        return shared[matrices[-1]:] if matrices else shared

    def _balance(self, items: list[Tensor], stacked: Tensor, values: Tensor,
                 shared: Iterable[Tensor] | None, features: Tensor | None,
                 context: Mapping[str, Any]) -> BalanceStep:
        layer = self.select_layer(self._shared_list(shared))
        # One vectorised backward from the K losses down to the layer only (heads and that
        # layer); the graph is kept for the single full backward pass that follows.
        scale = self._loss_scale
        if scale is None:
            grads = [g.detach() for g in task_jacobian(items, layer)]
        else:  # differentiate the scaled losses (no fp16 underflow), read unscaled gradients
            grads = [g.detach() / scale for g in task_jacobian([x * scale for x in items], layer)]
        total, weights = self.layer_objective(stacked, values, grads, context)
        return self._backward_total(total, weights)


# ---------------------------------------------------------------------- gradient methods
class GradientBalancer(Balancer):
    """Base of the methods that combine per-task gradients: the one place of the engine options.

    Subclass one of :class:`GramianWeighting`, :class:`BlockGramianWeighting` or
    :class:`JacobianAggregator`. The heads receive the plain gradient of their own task's loss;
    the shared parameters receive the combination.

    Args:
        tasks: task names.
        grad_on: ``"parameters"`` (exact: gradients of the shared parameters) or ``"features"``
            (cheap: gradients of the shared representation, as MGDA-UB; pass ``features=`` to
            :meth:`backward`).
        strategy: how the engine runs the K backward passes: ``"auto"``, ``"batched"``, ``"loop"``,
            ``"gramian"`` (Gram-only; see :mod:`mtlkit.engine._grads`).
        chunk_size: at most this many tasks per batched backward (bounds memory).
        check_finite: raise on a non-finite loss.
    """

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
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.grad_on: GradOn = grad_on
        self.strategy: Strategy = strategy
        self.chunk_size = None if chunk_size is None else int(chunk_size)

    def transform_losses(self, losses: list[Tensor], values: Tensor
                         ) -> tuple[list[Tensor], Tensor]:
        """(losses to differentiate, detached d transformed / d loss per task, shape (K,)).

        Gradient methods differentiate the transformed losses; the second tensor converts
        their weights into effective weights on the original task gradients. Each transformed
        loss must depend on its own task's loss only (so that a backward pass from it does not
        traverse the other tasks' heads), and a nonlinear transform must take its slope from
        ``values`` (the whole batch's losses), so that the ranks' gradients average to the
        whole batch's. Default: identity.
        """
        return losses, torch.ones(len(losses), device=values.device, dtype=values.dtype)

    def _combine(self, grads: TaskGradients, values: Tensor
                 ) -> tuple[Tensor, Callable[[], None]]:
        """(effective weights on the differentiated losses' gradients, the write of the
        update into ``.grad``), implemented by each family: compute first, then write."""
        raise NotImplementedError

    def _balance(self, items: list[Tensor], stacked: Tensor, values: Tensor,
                 shared: Iterable[Tensor] | None, features: Tensor | None,
                 context: Mapping[str, Any]) -> BalanceStep:
        shared_list = self._shared_list(shared)
        if self.grad_on == "features" and features is None:
            raise ValueError(
                f"{type(self).__name__}(grad_on='features') needs features=<the last shared "
                "representation> in backward()"
            )
        if self.requires == "jacobian" and world_size() > 1 and is_sharded(shared_list):
            raise NotImplementedError(
                f"{type(self).__name__} reads the whole K x P Jacobian, which no rank holds "
                "with FSDP-sharded shared parameters (each holds its shards); use a Gram-based "
                "method or a loss weighting"
            )
        self.block_shapes = tuple(p.shape for p in shared_list)
        # The engine gets the task losses themselves, not views of the stacked tensor: a
        # backward pass from one of them must not traverse every task's head.
        transformed, factor = self.transform_losses(items, values)
        scale = self._loss_scale
        if scale is not None:  # differentiate the scaled losses; read unscaled Gram matrices
            transformed = [x * scale for x in transformed]
        grads = task_gradients(
            transformed, shared_list, features, grad_on=self.grad_on, strategy=self.strategy,
            chunk_size=self.chunk_size,
            need_jacobian=self.requires in ("jacobian", "block_gramian"),  # not Gram-only
        )
        with torch.no_grad():
            if scale is not None:
                grads.unscale(scale)
                if not bool(torch.isfinite(grads.gramian).all()):  # the scaler reads it anyway
                    # Overflow: no weighting of non-finite gradients; write their plain sum
                    # (not finite either), so that the scaler skips the step.
                    weights = torch.full_like(values, float("nan"))
                    grads.apply_weights(torch.ones_like(values))
                    return BalanceStep(self.tasks, weights @ values, weights, grads.gramian)
            weights, write = self._combine(grads, values)
            write()
            weights = (weights.to(values.dtype) * factor.to(values.dtype)).detach()
        return BalanceStep(self.tasks, weights @ values, weights, grads.gramian)

    def extra_repr(self) -> str:
        return f"grad_on={self.grad_on!r}, strategy={self.strategy!r}"


class GramianWeighting(GradientBalancer):
    """K weights from the K x K Gram matrix ``G = J J^T`` of the task gradients (float64);
    the engine writes ``sum_k w_k g_k`` with no further backward pass. Hook:
    :meth:`gramian_weights`."""

    requires: ClassVar[Requirement] = "gramian"
    _hooks = ("gramian_weights",)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The weights (K,) from the Gram matrix (K, K, float64) and the loss values."""
        raise NotImplementedError

    def _combine(self, grads: TaskGradients, values: Tensor
                 ) -> tuple[Tensor, Callable[[], None]]:
        weights = self.gramian_weights(grads.gramian, values)
        return weights, lambda: grads.apply_weights(weights)


class BlockGramianWeighting(GradientBalancer):
    """One weight vector per block of shared parameters (one block per shared tensor, or the
    single features block), from each block's own Gram matrix (GradVac's per-layer
    granularity); block b receives ``sum_k W[b, k] g_k^(b)``. Hook: :meth:`block_weights`;
    ``self.block_shapes`` holds the shapes of this step's shared tensors while it runs."""

    requires: ClassVar[Requirement] = "block_gramian"
    _hooks = ("block_weights",)
    block_shapes: tuple[torch.Size, ...] = ()

    def block_weights(self, gramians: Tensor, losses: Tensor) -> Tensor:
        """Per-block weights (B, K) from the per-block Gram matrices (B, K, K, float64)."""
        raise NotImplementedError

    def _combine(self, grads: TaskGradients, values: Tensor
                 ) -> tuple[Tensor, Callable[[], None]]:
        blocks = grads.block_gramians
        per_block = self.block_weights(blocks, values)
        return _blend_block_weights(per_block.to(blocks.dtype), blocks), \
            lambda: grads.apply_block_weights(per_block)


class JacobianAggregator(GradientBalancer):
    """The combined shared gradient from the full K x P Jacobian, for methods that are not a
    linear combination of whole task gradients (e.g. GradDrop) or that keep per-coordinate
    state (DB-MTL). Hook: :meth:`aggregate`."""

    requires: ClassVar[Requirement] = "jacobian"
    _hooks = ("aggregate",)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """(combined shared gradient (P,), effective weights (K,)) from the Jacobian (K, P)."""
        raise NotImplementedError

    def _combine(self, grads: TaskGradients, values: Tensor
                 ) -> tuple[Tensor, Callable[[], None]]:
        vector, weights = self.aggregate(grads.jacobian_matrix(), values)
        return weights, lambda: grads.apply_vector(vector)


def _seeded_backward(roots: Tensor, seed: Tensor) -> None:
    """``roots.backward(seed)`` for a plain tensor and a seed of its shape, dtype and device
    (checked by the caller): the engine directly, without ``torch.autograd.backward``'s
    argument handling, whose Python cost (~10-30 us) is a visible share of a small model's
    step (the tiny suite of the speed benchmark). Tensor subclasses take the public call."""
    if type(roots) is Tensor and _engine_run_backward is not None:
        _engine_run_backward((roots,), (seed,), False, False, (), allow_unreachable=True,
                             accumulate_grad=True)
    else:
        torch.autograd.backward(roots, seed)


def _written_gradients_finite(items: list[Tensor], balancer: nn.Module) -> bool:
    """Whether every gradient a step may have written is finite: those of the leaves reached
    from the losses (shared and task-specific) and of the balancer's own parameters (the
    scaler's own check in ``scaler.step`` reads the same values: both agree on skipping)."""
    leaves = _task_leaves(items, set(), None).heads + list(balancer.parameters())
    grads = [p.grad for p in leaves if isinstance(p, Tensor) and p.grad is not None]
    if not grads:
        return True
    found: list[Tensor] = []
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_device.items():
        inf = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, inf, torch.ones(1, device=device))
        found.append(inf.cpu())
    return not bool(torch.cat(found).any())


def _blend_block_weights(per_block: Tensor, gramians: Tensor) -> Tensor:
    """One effective weight per task from per-block weights (B, K): the blocks' weights averaged
    in proportion to the task's squared gradient norm in each block (exact when all blocks
    agree); the plain mean for a task whose gradient is zero everywhere."""
    sq = gramians.diagonal(dim1=1, dim2=2)  # (B, K)
    total = sq.sum(0)
    blended = (per_block * sq).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, blended, per_block.mean(0))


class _HostWeights:
    """A step's weights computed on the host, made into a tensor (of the losses' dtype and
    device) only when read: a loop that never reads them pays nothing for them."""

    __slots__ = ("_device", "_dtype", "_tensor", "_values")

    def __init__(self, values: Sequence[float], like: Tensor) -> None:
        self._values, self._dtype, self._device = values, like.dtype, like.device
        self._tensor: Tensor | None = None

    def __call__(self) -> Tensor:
        if self._tensor is None:
            self._tensor = torch.tensor(self._values, dtype=self._dtype, device=self._device)
        return self._tensor


def frozen(values: Any) -> np.ndarray:
    """A read-only float64 copy of ``values``: weights a :meth:`LossWeighting.loss_weights`
    hook returns unchanged step after step (sent to the device once)."""
    out = np.array(values, dtype=np.float64)
    out.flags.writeable = False
    return out


def positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a hyperparameter that must be positive (or non-negative)."""
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value
