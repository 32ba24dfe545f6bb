"""Name -> balancer class, for ``create`` and the command line."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from mtlkit.balancers._base import Balancer

_REGISTRY: dict[str, type[Balancer]] = {}
B = TypeVar("B", bound=type[Balancer])


def register(name: str) -> Callable[[B], B]:
    """Class decorator: make a balancer available as ``create(name, ...)``.

    The class must subclass one of the family bases and implement its hook (see
    :mod:`mtlkit.balancers._base`); an incomplete class is refused here, at import time.
    """

    def wrap(cls: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"balancer name {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, Balancer)):
            raise TypeError(f"register({name!r}) needs a Balancer subclass, got {cls!r}")
        missing = cls.missing_hook()
        if missing:
            raise TypeError(f"cannot register {name!r}: {missing}")
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


def hyperparameters(cls: type[Balancer]) -> dict[str, inspect.Parameter]:
    """The keyword arguments a balancer class accepts besides ``tasks``: its own constructor's,
    and, where that passes ``**options`` on, its base classes' (the engine options of every
    gradient method, ``check_finite`` of every method), in that order.

    Example:
        >>> from mtlkit.balancers import get
        >>> list(hyperparameters(get("cagrad")))
        ['c', 'rescale', 'grad_on', 'strategy', 'chunk_size', 'check_finite']
    """
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__ or not issubclass(klass, Balancer):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        open_ended = False
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                open_ended = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in ("self", "tasks"):
                out.setdefault(p.name, p)
        if not open_ended:
            break
    return out


def create(name: str, tasks: Sequence[str], **hparams: Any) -> Balancer:
    """Build a balancer by registry name, e.g. ``create("dwa", tasks=["a", "b"], temperature=2)``.

    Every hyperparameter of the method and of its base (the engine options of a gradient
    method) is accepted; an unknown one is an error listing the accepted ones.
    """
    cls = get(name)
    accepted = list(hyperparameters(cls))
    unknown = [k for k in hparams if k not in accepted]
    if unknown:
        raise TypeError(f"{name}: unknown hyperparameter(s) {unknown}; accepted: {accepted}")
    return cls(tasks, **hparams)
