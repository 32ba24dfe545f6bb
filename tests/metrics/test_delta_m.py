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
