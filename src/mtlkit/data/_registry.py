"""The dataset registry: ``load(name, root=None, seed=0, **options)`` and ``available()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mtlkit.data._bundle import DatasetBundle

Builder = Callable[..., DatasetBundle]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[B], B]:
    """Register ``builder(root, seed, **options) -> DatasetBundle`` under ``name``."""

    def wrap(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def available() -> list[str]:
    """Names of the registered datasets, sorted.

    Example:
        >>> from mtlkit import data
        >>> data.available()
        ['celeba', 'gradnorm_toy', 'multidigits', 'nyud', 'nyuv2', 'pascal_context']
    """
    return sorted(_REGISTRY)


def options(name: str) -> dict[str, Any]:
    """The options a dataset accepts and their defaults (beyond ``root`` and ``seed``)."""
    builder = _get(name)
    params = inspect.signature(builder).parameters
    return {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in params.items()
        if k not in ("root", "seed")
    }


def _get(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def load(name: str, root: str | Path | None = None, seed: int = 0, **kw: Any) -> DatasetBundle:
    """Build a registered dataset.

    Args:
        name: one of :func:`available`.
        root: the data folder for datasets read from disk (``nyuv2``, ``celeba``); built-in
            datasets (``multidigits``, ``gradnorm_toy``) take none.
        seed: seeds every random choice of the dataset (generation, splits).
        **kw: dataset options (see each loader; an unknown option is an error).

    Raises:
        ValueError: unknown name or option.
        FileNotFoundError: a file the dataset needs is missing (the message names it).

    Example:
        >>> from mtlkit import data
        >>> bundle = data.load("multidigits", size=200)
        >>> bundle.task_names, bundle.input_shape
        (['left', 'right', 'sum'], (1, 12, 12))
    """
    builder = _get(name)
    accepted = options(name)
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(
            f"dataset {name!r}: unknown option(s) {unknown}; options are {sorted(accepted)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return builder(root=root, seed=seed, **kw)
