"""Name -> balancer class, for ``create`` and the command line."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from mtlkit.balancers._base import Balancer

_REGISTRY: dict[str, type[Balancer]] = {}
B = TypeVar("B", bound=type[Balancer])


def register(name: str) -> Callable[[B], B]:
    """Class decorator: make a balancer available as ``create(name, ...)``."""

    def wrap(cls: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"balancer name {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """The registry names of every balancer, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Balancer]:
    """The balancer class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown balancer {name!r}; available: {', '.join(available())}") from None


def create(name: str, tasks: Sequence[str], **hparams: Any) -> Balancer:
    """Build a balancer by registry name, e.g. ``create("dwa", tasks=["a", "b"], temperature=2)``.

    Unknown hyperparameters are an error listing the accepted ones.
    """
    cls = get(name)
    accepted: list[str] = []
    for klass in cls.__mro__:  # a constructor's **options go to its base class's
        params = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]
        accepted += [p.name for p in params if p.name not in ("self", "tasks", *accepted)
                     and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    unknown = [k for k in hparams if k not in accepted]
    if unknown:
        raise TypeError(f"{name}: unknown hyperparameter(s) {unknown}; accepted: {accepted}")
    return cls(tasks, **hparams)
