"""Δm% and Δp: the mean relative gain of a multi-task model over single-task baselines; mean rank.

The field writes the gain two ways, which differ on the same run whenever tasks have different
numbers of metrics, so a table should give both and say which one orders it:

- :func:`delta_m` (Maninis et al. 2019; Vandenhende et al. 2021; used by MTAN, Nash-MTL, FAMO):
  the mean over **every metric**;
- :func:`delta_p` (LibMTL; DB-MTL, Lin et al. 2023): the mean over **tasks** of each task's mean
  over its metrics, so a task with many metrics does not outweigh a task with one.
"""

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

    with ``l_i = 1`` when lower is better for metric ``i``. As in Vandenhende et al., *Multi-Task
    Learning for Dense Prediction Tasks: A Survey* (TPAMI 2021, arXiv:2004.13379) and later MTL
    work (MTAN, Nash-MTL, FAMO, ...) the mean runs over every metric (``T`` = number of keys such as
    ``"seg/miou"``); with ``per_task=True`` the metrics are first averaged within each task
    (the key's part before the first ``/``) and then over tasks, which is :func:`delta_p`.
    Positive is better.

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


def delta_p(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Δp in percent: the mean over tasks of each task's mean relative gain over its baseline.

    As defined by LibMTL (Lin and Zhang, JMLR 2023, arXiv:2203.14338) and used by DB-MTL (Lin et
    al. 2023, arXiv:2308.12029):

    .. math::

        \\Delta_p = \\frac{1}{T} \\sum_{t=1}^{T} \\frac{1}{N_t} \\sum_{i=1}^{N_t}
        (-1)^{l_{t,i}} \\frac{M_{m,t,i} - M_{b,t,i}}{M_{b,t,i}} \\times 100

    where task ``t`` has ``N_t`` metrics (keys ``"t/<metric>"``). Equal to
    ``delta_m(..., per_task=True)``; with one metric per task it equals :func:`delta_m`.

    Example:
        >>> from mtlkit.metrics import delta_p
        >>> dp = delta_p({"seg/miou": 0.44, "seg/pix_acc": 0.80, "depth/abs_err": 0.45},
        ...              {"seg/miou": 0.40, "seg/pix_acc": 0.80, "depth/abs_err": 0.50},
        ...              {"seg/miou": True, "seg/pix_acc": True, "depth/abs_err": False})
        >>> round(dp, 6)  # seg: (10 + 0) / 2 = 5; depth: +10; (5 + 10) / 2
        7.5
    """
    return delta_m(metrics, baseline, higher_is_better, per_task=True)


def mean_rank(
    values: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]
) -> dict[str, float]:
    """Each method's rank (1 = best) on every metric, averaged over the metrics.

    Ties share the average of the ranks they span (two methods tied for first both get 1.5), so
    the order in which methods are listed never matters. A NaN value ranks below every number
    (NaNs tie among themselves).

    Args:
        values: method -> metric key -> value.
        higher_is_better: metric key -> direction; its keys are the metrics ranked.

    Raises:
        ValueError: no method, no metric, or a method without one of the metrics.

    Example:
        >>> from mtlkit.metrics import mean_rank
        >>> mean_rank({"a": {"acc": 0.9, "err": 1.0}, "b": {"acc": 0.9, "err": 2.0},
        ...            "c": {"acc": 0.5, "err": 1.0}}, {"acc": True, "err": False})
        {'a': 1.5, 'b': 2.25, 'c': 2.25}
    """
    if not values:
        raise ValueError("values is empty; mean rank needs at least one method")
    if not higher_is_better:
        raise ValueError("higher_is_better is empty; mean rank needs at least one metric")
    for method, row in values.items():
        missing = sorted(set(higher_is_better) - set(row))
        if missing:
            raise ValueError(f"values[{method!r}] has no value for {missing}")
    totals = dict.fromkeys(values, 0.0)
    for key, higher in higher_is_better.items():
        sign = -1.0 if higher else 1.0

        def order(m: str, key: str = key, sign: float = sign) -> tuple[bool, float]:
            v = float(values[m][key])
            return (math.isnan(v), 0.0 if math.isnan(v) else sign * v)

        ranked = sorted(values, key=order)
        start = 0
        while start < len(ranked):  # a run of equal keys shares the mean of its positions
            end = start
            while end + 1 < len(ranked) and order(ranked[end + 1]) == order(ranked[start]):
                end += 1
            shared = (start + end) / 2 + 1
            for m in ranked[start : end + 1]:
                totals[m] += shared
            start = end + 1
    return {m: total / len(higher_is_better) for m, total in totals.items()}
