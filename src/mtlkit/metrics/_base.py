"""The stateful metric base: summable sufficient statistics, merge and distributed sync."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mtlkit.metrics._utils import as_bool_mask, check_tensor, float_dtype

Reduce = Literal["sum", "cat"]
ReduceFn = Callable[[Tensor], Tensor]
GatherFn = Callable[[Tensor], Sequence[Tensor]]


class Metric:
    """A metric accumulated over batches from sufficient statistics.

    Subclasses register their state with :meth:`add_state` in ``__init__`` and implement
    ``_update`` and ``_compute``. Every state is a plain tensor with a reduction:

    * ``"sum"``: counts and sums (or a confusion matrix). Adding the states of two halves of the
      data gives the state of the whole, so accumulation over batches of any sizes, and an
      all-reduce over ranks with uneven shards, is exact (it is never a mean of batch means).
    * ``"cat"``: kept values, concatenated along dimension 0 (exact ROC AUC and exact medians
      need them). Their memory grows with the data; the classes that use one say so.

    ``update(pred, target, mask=None)`` takes a batch; ``mask`` (bool, per sample or per
    element/pixel) marks labelled entries, and unlabelled ones contribute nothing.
    ``compute()`` returns a Python float (NaN when nothing valid was seen). ``reset()`` clears
    the state. For distributed evaluation, either call :meth:`sync_distributed` on every rank
    before ``compute()``, or pass your own collectives to :meth:`sync`; :meth:`state` and
    :meth:`merge` exchange the raw statistics.

    Class attributes: ``higher_is_better`` (the sign used by :func:`mtlkit.metrics.delta_m` and
    by model selection) and ``name`` (default key; some instances refine it, e.g.
    ``within_11.25``).

    Updates run under ``torch.no_grad()`` on detached inputs and perform no host
    synchronisation unless ``validate_args=True`` (the default) asks for a value check of the
    labels, which costs one small device-to-host copy per batch.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import MAE
        >>> m = MAE()
        >>> m.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
        >>> m.update(torch.tensor([4.0]), torch.tensor([0.0]))
        >>> m.compute()  # (1 + 2 + 4) / 3, not the mean of the batch means (1.5 + 4) / 2
        2.3333333333333335
        >>> sorted(m.state())
        ['count', 'total']
    """

    name: str = "metric"
    higher_is_better: ClassVar[bool]

    def __init__(self) -> None:
        self._reduce: dict[str, Reduce] = {}
        self._defaults: dict[str, Tensor] = {}
        self._sums: dict[str, Tensor] = {}
        self._chunks: dict[str, list[Tensor]] = {}
        self._device = torch.device("cpu")
        self.num_updates = 0

    # ----------------------------------------------------------------- state registry
    def add_state(self, name: str, default: Tensor, reduce: Reduce = "sum") -> None:
        """Register a state tensor.

        Args:
            name: the state's key in :meth:`state`.
            default: its value after :meth:`reset` (for ``"cat"``: an empty tensor whose
                trailing shape and dtype the kept rows have, e.g. ``torch.zeros(0, 3)``).
            reduce: ``"sum"`` (summed across batches and ranks) or ``"cat"`` (concatenated).
        """
        if reduce not in ("sum", "cat"):
            raise ValueError(f"reduce must be 'sum' or 'cat', got {reduce!r}")
        check_tensor(default, "default")
        if name in self._reduce:
            raise ValueError(f"state {name!r} is already registered")
        if reduce == "cat" and default.shape[:1] != (0,):
            raise ValueError(
                "the default of a 'cat' state must be empty along dim 0, "
                f"got {tuple(default.shape)}"
            )
        self._reduce[name] = reduce
        self._defaults[name] = default.detach().clone()
        self._reset_one(name)

    def _dtype(self, name: str, device: torch.device) -> torch.dtype:
        dtype = self._defaults[name].dtype
        return float_dtype(device) if dtype == torch.float64 else dtype

    def _reset_one(self, name: str) -> None:
        default = self._defaults[name].to(self._device, self._dtype(name, self._device))
        if self._reduce[name] == "sum":
            self._sums[name] = default.clone()
        else:
            self._chunks[name] = [default.clone()]

    def reset(self) -> None:
        """Clear the accumulated state."""
        for name in self._reduce:
            self._reset_one(name)
        self.num_updates = 0

    def _add(self, name: str, value: Tensor) -> None:
        cur = self._sums[name]
        self._sums[name] = cur + value.to(cur.dtype)

    def _append(self, name: str, rows: Tensor) -> None:
        ref = self._chunks[name][0]
        self._chunks[name].append(rows.to(ref.dtype))

    def _get(self, name: str) -> Tensor:
        if self._reduce[name] == "sum":
            return self._sums[name]
        chunks = self._chunks[name]
        if len(chunks) > 1:  # consolidate once, so repeated compute() stays cheap
            self._chunks[name] = [torch.cat(chunks)]
        return self._chunks[name][0]

    def to(self, device: torch.device | str) -> Metric:
        """Move the state to ``device`` (done automatically on the first ``update``)."""
        device = torch.device(device)
        for name in self._reduce:
            dtype = self._dtype(name, device)
            if self._reduce[name] == "sum":
                self._sums[name] = self._sums[name].to(device, dtype)
            else:
                self._chunks[name] = [c.to(device, dtype) for c in self._chunks[name]]
        self._device = device
        return self

    # ----------------------------------------------------------------- public API
    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate one batch (see the class docstring for ``mask``)."""
        check_tensor(pred, "pred")
        check_tensor(target, "target")
        mask = as_bool_mask(mask)
        if pred.shape[:1] != target.shape[:1]:
            raise ValueError(
                f"{self.name}: pred has {pred.shape[0] if pred.dim() else 'no'} samples, "
                f"target has {target.shape[0] if target.dim() else 'no'}"
            )
        if pred.device != self._device:
            self.to(pred.device)
        with torch.no_grad():
            self._update(
                pred.detach(),
                target.detach().to(pred.device),
                None if mask is None else mask.to(pred.device),
            )
        self.num_updates += 1

    def compute(self) -> float:
        """The metric over everything accumulated since the last reset (NaN if nothing)."""
        with torch.no_grad():
            return float(self._compute())

    def state(self) -> dict[str, Tensor]:
        """A copy of the raw statistics, keyed by state name ("cat" states concatenated)."""
        return {name: self._get(name).clone() for name in self._reduce}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the statistics by ``state`` (as returned by :meth:`state`)."""
        self._check_state(state)
        for name, value in state.items():
            value = value.to(self._device)
            if self._reduce[name] == "sum":
                self._sums[name] = value.to(self._sums[name].dtype).clone()
            else:
                self._chunks[name] = [value.to(self._chunks[name][0].dtype).clone()]

    def merge(self, other: Metric | Mapping[str, Tensor]) -> Metric:
        """Add another metric's statistics (or a :meth:`state` dict) into this one.

        The result is the metric of the union of both inputs. Returns ``self``.
        """
        if isinstance(other, Metric):
            if type(other) is not type(self):
                raise ValueError(
                    f"cannot merge a {type(other).__name__} into a {type(self).__name__}"
                )
            other = other.state()
        self._check_state(other)
        for name, value in other.items():
            value = value.to(self._device)
            if self._reduce[name] == "sum":
                self._add(name, value)
            else:
                self._append(name, value)
        return self

    def sync(self, reduce_fn: ReduceFn, gather_fn: GatherFn | None = None) -> None:
        """Replace the local state by the state over all ranks.

        Args:
            reduce_fn: returns the element-wise sum of a tensor over all ranks (used for the
                ``"sum"`` states, in registration order).
            gather_fn: returns the list of every rank's tensor, in rank order, whose lengths
                along dimension 0 may differ (used for the ``"cat"`` states). Required only if
                the metric has one.

        Every rank must call ``sync`` (collectives are issued in the same order everywhere).
        """
        for name, red in self._reduce.items():
            if red == "sum":
                self._sums[name] = reduce_fn(self._sums[name].clone())
            else:
                if gather_fn is None:
                    raise ValueError(
                        f"{type(self).__name__} keeps values ({name!r}); sync needs gather_fn"
                    )
                parts = list(gather_fn(self._get(name)))
                self._chunks[name] = [torch.cat([p.to(self._device) for p in parts])]

    def sync_distributed(self, group: object | None = None) -> None:
        """:meth:`sync` with ``torch.distributed`` collectives (all-reduce and all-gather).

        Call it on every rank of ``group`` (default: the world) before :meth:`compute`.
        Kept values of uneven length are padded for the all-gather and trimmed after.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "sync_distributed needs an initialised torch.distributed process group"
            )

        def reduce_fn(t: Tensor) -> Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
            return t

        def gather_fn(t: Tensor) -> list[Tensor]:
            world = dist.get_world_size(group)  # type: ignore[arg-type]
            n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
            sizes = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(sizes, n, group=group)  # type: ignore[arg-type]
            lengths = [int(s) for s in sizes]
            longest = max(lengths)
            padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
            padded[: t.shape[0]] = t
            bufs = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(bufs, padded, group=group)  # type: ignore[arg-type]
            return [b[:k] for b, k in zip(bufs, lengths)]

        self.sync(reduce_fn, gather_fn)

    def clone(self) -> Metric:
        """A deep copy (configuration and state)."""
        return copy.deepcopy(self)

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        if set(state) != set(self._reduce):
            raise ValueError(
                f"{type(self).__name__}: state keys {sorted(state)} differ from "
                f"{sorted(self._reduce)}"
            )
        for name, value in state.items():
            check_tensor(value, f"state[{name!r}]")
            ref = self._defaults[name]
            same = (
                value.shape == ref.shape
                if self._reduce[name] == "sum"
                else value.shape[1:] == ref.shape[1:]
            )
            if not same:
                raise ValueError(
                    f"{type(self).__name__}: state[{name!r}] has shape {tuple(value.shape)}, "
                    f"expected {tuple(ref.shape)}"
                    + (" (any length)" if self._reduce[name] == "cat" else "")
                )

    # ----------------------------------------------------------------- subclass hooks
    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        raise NotImplementedError

    def _compute(self) -> Tensor | float:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def __str__(self) -> str:
        return self.name
