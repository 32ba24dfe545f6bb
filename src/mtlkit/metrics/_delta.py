"""Δm%: the mean relative gain of a multi-task model over single-task baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping


def _check_keys(metrics: Mapping[str, float], other: Mapping[str, object], arg: str) -> None:
    missing = sorted(set(metrics) - set(other))
    extra = sorted(set(other) - set(metrics))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"has extra {extra}")
        raise ValueError(f"{arg} must have the same keys as metrics: it " + " and ".join(parts))


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    *,
    per_task: bool = False,
) -> float:
    """Δm in percent: the average relative improvement over the baselines, sign-corrected.

    Proposed in Maninis, Radosavovic and Kokkinos, *Attentive Single-Tasking of Multiple Tasks*
    (CVPR 2019, arXiv:1904.08918):

    .. math::

        \\Delta_m = \\frac{1}{T} \\sum_{i=1}^{T} (-1)^{l_i}
        \\frac{M_{m,i} - M_{b,i}}{M_{b,i}} \\times 100

    with ``l_i = 1`` when lower is better for metric ``i``. As in later MTL work (MTAN,
    Nash-MTL, FAMO, ...) the mean runs over every metric (``T`` = number of keys such as
    ``"seg/miou"``); with ``per_task=True`` the metrics are first averaged within each task
    (the key's part before the first ``/``) and then over tasks. Positive is better.

    .. note:: The denominator is ``|M_b,i|``, identical to the paper for the usual positive
       metrics, and keeps the sign meaningful if a baseline is negative.

    Args:
        metrics: metric key -> value of the multi-task model.
        baseline: metric key -> value of the single-task baseline (non-zero).
        higher_is_better: metric key -> direction.
        per_task: average within tasks first.

    Raises:
        ValueError: keys differ, a value is not finite, or a baseline is 0.

    Example:
        >>> from mtlkit.metrics import delta_m
        >>> dm = delta_m({"seg/miou": 0.44, "depth/abs_err": 0.45},
        ...              {"seg/miou": 0.40, "depth/abs_err": 0.50},
        ...              {"seg/miou": True, "depth/abs_err": False})
        >>> round(dm, 6)  # miou +10%, abs_err 10% lower (better): (10 + 10) / 2
        10.0
    """
    if not metrics:
        raise ValueError("metrics is empty; Δm needs at least one metric")
    _check_keys(metrics, baseline, "baseline")
    _check_keys(metrics, higher_is_better, "higher_is_better")
    gains: dict[str, float] = {}
    for key in metrics:
        value, base, higher = metrics[key], baseline[key], higher_is_better[key]
        if not isinstance(higher, bool):
            raise ValueError(f"higher_is_better[{key!r}] must be a bool, got {higher!r}")  # noqa: TRY004
        for arg, v in (("metrics", value), ("baseline", base)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{arg}[{key!r}] must be a finite number, got {v!r}")
        if base == 0:
            raise ValueError(f"baseline[{key!r}] is 0; the relative change is undefined")
        sign = 1.0 if higher else -1.0
        gains[key] = sign * (value - base) / abs(base)
    if per_task:
        groups: dict[str, list[float]] = {}
        for key, g in gains.items():
            groups.setdefault(key.split("/", 1)[0], []).append(g)
        values = [sum(v) / len(v) for v in groups.values()]
    else:
        values = list(gains.values())
    return 100.0 * sum(values) / len(values)
