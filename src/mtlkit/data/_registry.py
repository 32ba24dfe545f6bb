"""The dataset registry: ``load(name, root=None, seed=0, **options)`` and ``available()``."""

from __future__ import annotations

import importlib
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
        ['celeba', 'gradnorm_toy', 'multidigits', 'nyuv2']
    """
    return sorted(_REGISTRY)


def options(name: str) -> dict[str, Any]:
    """The options a dataset accepts and their defaults (beyond ``root`` and ``seed``)."""
    builder = _get(name)
    params = inspect.signature(builder).parameters
    return {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in params.items()
        if k not in ("root", "seed") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def _get(name: str) -> Builder:
    if isinstance(name, str) and ":" in name:  # a user's own loader: package.module:function
        module, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"dataset {name!r}: cannot import {attr!r} from {module!r} ({exc})"
            ) from None
        if not callable(builder):
            raise ValueError(f"dataset {name!r} is not callable")
        return builder
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def _takes(builder: Builder, arg: str) -> bool:
    params = inspect.signature(builder).parameters
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def load(name: str, root: str | Path | None = None, seed: int = 0, **kw: Any) -> DatasetBundle:
    """Build a registered dataset.

    Args:
        name: one of :func:`available`, or ``package.module:function`` naming a user's loader
            that returns a :class:`DatasetBundle` (called with the options, and with ``root``
            and ``seed`` where its signature takes them).
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
    params = inspect.signature(builder).parameters.values()
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = sorted(set(kw) - set(accepted))
    if unknown and not open_ended:
        raise ValueError(
            f"dataset {name!r}: unknown option(s) {unknown}; options are {sorted(accepted)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if name in _REGISTRY:
        return builder(root=root, seed=seed, **kw)
    # a user's function gets root and seed only where its signature takes them
    if root is not None and not _takes(builder, "root"):
        raise ValueError(f"dataset {name!r} takes no root, but root={root!r} was given")
    extra = {"root": root} if root is not None else {}
    if _takes(builder, "seed"):
        extra["seed"] = seed
    bundle = builder(**extra, **kw)
    if not isinstance(bundle, DatasetBundle):
        raise TypeError(f"dataset {name!r} returned a {type(bundle).__name__}, not a "
                        f"mtlkit.data.DatasetBundle")
    return bundle
