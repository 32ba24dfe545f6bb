"""The interface every multi-task architecture implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn


def check_tasks(tasks: Iterable[str], name: str = "tasks") -> tuple[str, ...]:
    """Validate task names: at least one, unique, non-empty strings without ``.``.

    ``.`` is refused because task names become keys of ``nn.ModuleDict``.
    """
    if isinstance(tasks, str):
        raise TypeError(f"{name} must be a sequence of task names, got the string {tasks!r}")
    result = tuple(tasks)
    if not result:
        raise ValueError(f"{name} must name at least one task")
    for t in result:
        if not isinstance(t, str) or not t or "." in t:
            raise ValueError(f"{name}: task names must be non-empty strings without '.', got {t!r}")
    if len(set(result)) != len(result):
        dupes = sorted({t for t in result if result.count(t) > 1})
        raise ValueError(f"{name}: duplicate task names {dupes}")
    return result


def check_out_features(tasks: Mapping[str, int], name: str = "tasks") -> dict[str, int]:
    """Validate a mapping task name -> output size (a positive int)."""
    if not isinstance(tasks, Mapping):
        raise TypeError(f"{name} must be a mapping task name -> output size, got {type(tasks)}")
    check_tasks(tasks.keys(), name)
    for t, n in tasks.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}[{t!r}] must be a positive int (output size), got {n!r}")
    return dict(tasks)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def int_sequence(name: str, values: Sequence[int], minimum: int = 1) -> tuple[int, ...]:
    """Validate a sequence of ints >= ``minimum``."""
    if isinstance(values, (str, int)):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    return tuple(positive_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(values))


class MultiTaskModel(nn.Module, ABC):
    """Base class of the multi-task architectures: one network, one output per task.

    A subclass implements :meth:`forward` (input -> ``{task: output}``) and
    :meth:`_task_parameters` (the parameters only that task uses). Everything else is derived:
    :meth:`shared_parameters` is every parameter no single task owns, so the shared set and
    the per-task sets always partition ``model.parameters()``.

    Attributes:
        tasks: the task names, in output order.
        features: after each forward, the last shared representation (a tensor in the graph,
            which the per-task losses depend on only through the task-specific parameters
            after it), used by balancers with ``grad_on="features"``. ``None`` before the
            first forward and for architectures with no single shared tensor (each class
            documents its choice; :meth:`require_features` raises with the reason). Every
            parameter behind it is shared. It holds the graph of the last forward until the
            next one.

    "Shared" means *used by more than one task*: a parameter whose value can change the loss
    of two tasks. Soft-sharing models (cross-stitch, sluice) therefore count every column
    layer before the last mixing unit as shared, since mixing feeds it to all tasks.

    Example:
        >>> import torch
        >>> from mtlkit.nn import HardSharing
        >>> model = HardSharing(torch.nn.Linear(4, 8), {"a": torch.nn.Linear(8, 1)})
        >>> model.tasks
        ('a',)
        >>> len(list(model.shared_parameters())), len(list(model.task_parameters("a")))
        (2, 2)
    """

    tasks: tuple[str, ...]
    features: Tensor | None

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.features = None

    @abstractmethod
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the network; return ``{task: output}`` in :attr:`tasks` order."""

    @abstractmethod
    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        """The parameters only ``task`` uses (``task`` is already validated)."""

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters used by ``task`` only (its head, gate, tower, ...).

        Raises:
            ValueError: ``task`` is not one of :attr:`tasks`.
        """
        self._check_task(task)
        return iter(_unique(self._task_parameters(task)))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters used by more than one task: all parameters no single task owns."""
        owned = {id(p) for t in self.tasks for p in self._task_parameters(t)}
        return iter([p for p in self.parameters() if id(p) not in owned])

    def require_features(self) -> Tensor:
        """:attr:`features` of the last forward, for ``grad_on="features"``; raises if there is
        none.

        Pass it as ``balancer.backward(losses, shared=..., features=model.require_features())``
        where a balancer takes per-task gradients at the features: the error then says why an
        architecture has no such tensor, where ``features=model.features`` (``None``) would
        only say that the balancer needs one. Keep ``features=model.features`` for
        ``grad_on="parameters"``, where ``None`` is fine.

        Raises:
            ValueError: the architecture, as configured, has no tensor through which all
                shared computation reaches the losses (the reason is in the message); or no
                forward has run yet.
        """
        reason = self._no_features_reason()
        if reason is not None:
            raise ValueError(
                f"{type(self).__name__} has no single shared representation for "
                f"grad_on='features': {reason}; use grad_on='parameters'"
            )
        if self.features is None:
            raise ValueError(f"{type(self).__name__}.features is None: run a forward pass first")
        return self.features

    def _no_features_reason(self) -> str | None:
        """Why :attr:`features` stays ``None`` for this model, or ``None`` if it is set."""
        return None

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has tasks {list(self.tasks)}")

    def _check_partition(self) -> None:
        """Raise ValueError if two tasks claim the same parameter (e.g. a head given twice)."""
        owner: dict[int, str] = {}
        for t in self.tasks:
            for p in self._task_parameters(t):
                other = owner.setdefault(id(p), t)
                if other != t:
                    raise ValueError(
                        f"tasks {other!r} and {t!r} share a parameter of shape "
                        f"{tuple(p.shape)}; give each task its own module"
                    )

    def _output_dict(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: outputs[t] for t in self.tasks}

    def __getstate__(self) -> dict[str, Any]:
        # ``features`` is a non-leaf tensor from the last forward: it cannot be deep-copied or
        # pickled and must not keep a graph alive in a copy.
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["features"] = None
        return state


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    result = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            result.append(p)
    return result
