"""Δm% (Maninis et al. 2019) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from mtlkit.metrics import delta_m

METRICS = {
    "seg/miou": 0.50,
    "seg/pixel_acc": 0.70,
    "depth/abs_err": 0.60,
    "normal/mean_angle": 22.0,
}
BASE = {"seg/miou": 0.40, "seg/pixel_acc": 0.70, "depth/abs_err": 0.50, "normal/mean_angle": 20.0}
HIGHER = {
    "seg/miou": True,
    "seg/pixel_acc": True,
    "depth/abs_err": False,
    "normal/mean_angle": False,
}
# relative changes, sign-corrected: miou +25%, pixel_acc 0%, abs_err -20% (worse),
# mean_angle -10% (worse)


def test_delta_m_mixed_directions_by_hand():
    assert delta_m(METRICS, BASE, HIGHER) == pytest.approx((25 + 0 - 20 - 10) / 4)


def test_delta_m_per_task_averages_within_tasks_first():
    # seg: (25 + 0) / 2 = 12.5; depth: -20; normal: -10
    assert delta_m(METRICS, BASE, HIGHER, per_task=True) == pytest.approx((12.5 - 20 - 10) / 3)


def test_delta_m_is_zero_for_the_baseline_and_flips_with_direction():
    assert delta_m(BASE, BASE, HIGHER) == 0.0
    flipped = {k: not v for k, v in HIGHER.items()}
    assert delta_m(METRICS, BASE, flipped) == pytest.approx(-delta_m(METRICS, BASE, HIGHER))


def test_delta_m_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"baseline\['depth/abs_err'\] is 0"):
        delta_m(METRICS, {**BASE, "depth/abs_err": 0.0}, HIGHER)
    with pytest.raises(
        ValueError, match=r"baseline must have the same keys as metrics: it missing \['seg/miou'\]"
    ):
        delta_m(METRICS, {k: v for k, v in BASE.items() if k != "seg/miou"}, HIGHER)
    with pytest.raises(ValueError, match=r"has extra \['x/y'\]"):
        delta_m(METRICS, BASE, {**HIGHER, "x/y": True})
    with pytest.raises(ValueError, match=r"metrics\['seg/miou'\] must be a finite number"):
        delta_m({**METRICS, "seg/miou": math.nan}, BASE, HIGHER)
    with pytest.raises(ValueError, match="empty"):
        delta_m({}, {}, {})


def test_delta_p_averages_each_task_first_by_hand():
    from mtlkit.metrics import delta_p

    # seg: (25 + 0) / 2 = 12.5; depth: -20; normal: -10 -> (12.5 - 20 - 10) / 3 = -5.8333
    assert delta_p(METRICS, BASE, HIGHER) == pytest.approx(-35 / 6)
    # Δm% over the 4 metrics weighs seg twice: (25 + 0 - 20 - 10) / 4 = -1.25
    assert delta_m(METRICS, BASE, HIGHER) == pytest.approx(-1.25)
    one_each = {k: v for k, v in METRICS.items() if k != "seg/pixel_acc"}
    sub = {k: BASE[k] for k in one_each}
    hib = {k: HIGHER[k] for k in one_each}
    assert delta_p(one_each, sub, hib) == pytest.approx(delta_m(one_each, sub, hib))


def test_mean_rank_by_hand_with_ties_averaged():
    from mtlkit.metrics import mean_rank

    higher = {"a/acc": True, "b/err": False, "c/f1": True}
    values = {
        "x": {"a/acc": 0.9, "b/err": 1.0, "c/f1": 0.2},
        "y": {"a/acc": 0.9, "b/err": 3.0, "c/f1": 0.2},
        "z": {"a/acc": 0.8, "b/err": 1.0, "c/f1": 0.2},
        "w": {"a/acc": 0.7, "b/err": 2.0, "c/f1": math.nan},
    }
    # a/acc: x, y tie for 1-2 -> 1.5 each; z 3; w 4
    # b/err: x, z tie for 1-2 -> 1.5 each; w 3; y 4
    # c/f1:  x, y, z tie for 1-3 -> 2 each; NaN last -> 4
    ranks = mean_rank(values, higher)
    assert ranks == pytest.approx({"x": (1.5 + 1.5 + 2) / 3, "y": (1.5 + 4 + 2) / 3,
                                   "z": (3 + 1.5 + 2) / 3, "w": (4 + 3 + 4) / 3})
    # two methods with identical metrics share every rank, whatever order they are listed in
    same = {"p": {"a/acc": 0.5}, "q": {"a/acc": 0.5}}
    assert mean_rank(same, {"a/acc": True}) == {"p": 1.5, "q": 1.5}
    assert mean_rank(dict(reversed(values.items())), higher) == pytest.approx(ranks)
    # the ranks of n methods always sum to n (n + 1) / 2 per metric
    assert sum(ranks.values()) == pytest.approx(4 * 5 / 2)
    with pytest.raises(ValueError, match=r"values\['p'\] has no value for \['b/err'\]"):
        mean_rank(same, {"a/acc": True, "b/err": False})
