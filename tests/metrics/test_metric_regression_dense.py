"""MAE/RMSE, segmentation, depth and surface-normal metrics against hand-computed values."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mtlkit.metrics import (
    MAE,
    RMSE,
    AbsErr,
    MeanIoU,
    NormalAngleMean,
    NormalAngleMedian,
    NormalWithin,
    PixelAccuracy,
    RelErr,
)

DEVICE = torch.device(os.environ.get("MTLKIT_TEST_DEVICE", "cpu"))


def t(values, dtype=None):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- regression
def test_mae_rmse_pooled_over_uneven_batches():
    mae, rmse = MAE(), RMSE()
    for pred, target in ((t([[1.0], [2.0]]), t([0.0, 0.0])), (t([[4.0]]), t([0.0]))):
        mae.update(pred, target)
        rmse.update(pred, target)
    assert mae.compute() == pytest.approx(7 / 3)  # mean of batch means: 2.75
    assert rmse.compute() == pytest.approx(math.sqrt(21 / 3))


def test_regression_mask_ignores_nan_targets():
    pred = t([1.0, 2.0, 3.0])
    target = t([0.0, float("nan"), 5.0])
    mask = t([True, False, True])
    mae, rmse = MAE(), RMSE()
    mae.update(pred, target, mask)
    rmse.update(pred, target, mask)
    assert mae.compute() == pytest.approx(1.5)  # (1 + 2) / 2
    assert rmse.compute() == pytest.approx(math.sqrt(2.5))  # (1 + 4) / 2


def test_regression_multi_output_mask_per_sample():
    pred = t([[1.0, 1.0], [5.0, 5.0]])
    target = t([[0.0, 3.0], [0.0, 0.0]])
    m = MAE()
    m.update(pred, target, t([True, False]))
    assert m.compute() == pytest.approx(1.5)  # (1 + 2) / 2


def test_regression_refuses_broadcasting_shapes():
    with pytest.raises(ValueError, match="must match"):
        MAE().update(t([1.0, 2.0]), t([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="mask has shape"):
        MAE().update(t([1.0, 2.0]), t([1.0, 2.0]), t([True]))


# ---------------------------------------------------------------- segmentation
SEG_TARGET = [[[0, 0, 1], [1, 2, -1]], [[2, 2, 0], [0, 1, 1]]]
SEG_PRED = [[[0, 1, 1], [1, 2, 2]], [[2, 0, 0], [0, 1, 2]]]
# confusion (rows target, cols pred): [[3, 1, 0], [0, 3, 1], [1, 0, 2]]
# IoU: 3/5, 3/5, 2/4; pixel accuracy 8/11


def test_miou_and_pixel_accuracy_by_hand_in_two_uneven_batches():
    target, pred = t(SEG_TARGET), t(SEG_PRED)
    miou, pacc = MeanIoU(3), PixelAccuracy(3)
    for m in (miou, pacc):
        m.update(pred[:1], target[:1])
        m.update(pred[1:], target[1:])
    assert miou.compute() == pytest.approx((0.6 + 0.6 + 0.5) / 3)
    assert pacc.compute() == pytest.approx(8 / 11)
    assert miou.state()["confmat"].tolist() == [[3, 1, 0], [0, 3, 1], [1, 0, 2]]


def test_segmentation_from_logits_equals_from_labels():
    target, pred = t(SEG_TARGET), t(SEG_PRED)
    logits = torch.nn.functional.one_hot(pred.clamp_min(0), 3).permute(0, 3, 1, 2).float() * 5
    m = MeanIoU(3)
    m.update(logits, target)
    assert m.compute() == pytest.approx(1.7 / 3)


def test_segmentation_masks_ignore_index_and_absent_class():
    target, pred = t(SEG_TARGET), t(SEG_PRED)
    m = MeanIoU(4)  # class 3 absent everywhere: left out of the mean
    m.update(pred, target, mask=t([True, False]))  # first image only
    # image 1 pairs (t, p): (0,0) (0,1) (1,1) (1,1) (2,2); -1 ignored
    # IoU0 = 1/2, IoU1 = 2/3, IoU2 = 1/1
    assert m.compute() == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    p = PixelAccuracy(3, ignore_index=255)
    p.update(t([[1, 0]]), t([[1, 255]]))
    assert p.compute() == 1.0
    with pytest.raises(ValueError, match="target holds label 3"):
        MeanIoU(3).update(t([[0, 1]]), t([[0, 3]]))
    with pytest.raises(ValueError, match="ignore_index=1"):
        MeanIoU(3, ignore_index=1)


# ---------------------------------------------------------------- depth
def test_depth_errors_over_valid_pixels_and_batches():
    pred = t([[[[1.0, 5.0], [5.0, 1.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    target = t([[[[2.0, 0.0], [4.0, 1.0]]], [[[0.0, 0.0], [0.0, 6.0]]]])
    ab, rel = AbsErr(), RelErr()
    for m in (ab, rel):
        m.update(pred[:1], target[:1])
        m.update(pred[1:], target[1:])
    # valid pixels: 2 -> 1, 4 -> 5, 1 -> 1, 6 -> 3; abs 1, 1, 0, 3; rel 1/2, 1/4, 0, 1/2
    assert ab.compute() == pytest.approx(5 / 4)
    assert rel.compute() == pytest.approx(1.25 / 4)


def test_depth_masks_per_sample_and_per_pixel():
    pred = t([[[[1.0, 5.0]]], [[[3.0, 3.0]]]])
    target = t([[[[2.0, 4.0]]], [[[1.0, 1.0]]]])
    m = AbsErr()
    m.update(pred, target, mask=t([True, False]))
    assert m.compute() == pytest.approx(1.0)
    m2 = AbsErr()
    m2.update(pred[:, 0], target[:, 0], mask=t([[[False, True]], [[True, False]]]))
    assert m2.compute() == pytest.approx((1.0 + 2.0) / 2)
    m3 = AbsErr()
    m3.update(pred, target, mask=t([False, False]))
    assert math.isnan(m3.compute())


# ---------------------------------------------------------------- normals
def _normals(angles_deg, scales, invalid=0):
    """Predictions at the given angles from the x axis (not unit length), x-axis targets,
    laid out as (1, 3, 1, W), plus ``invalid`` pixels with a zero target."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    s = torch.tensor(scales, dtype=torch.float64)
    pred = torch.stack([a.cos() * s, a.sin() * s, torch.zeros_like(a)])
    target = torch.stack([torch.ones_like(a), torch.zeros_like(a), torch.zeros_like(a)])
    if invalid:
        pred = torch.cat([pred, torch.ones(3, invalid, dtype=torch.float64)], 1)
        target = torch.cat([target, torch.zeros(3, invalid, dtype=torch.float64)], 1)
    return pred[None, :, None].float().to(DEVICE), target[None, :, None].float().to(DEVICE)


def test_normal_metrics_by_hand():
    pred, target = _normals([0.0, 10.0, 20.0, 45.0, 90.0], [1.0, 2.0, 0.5, 3.0, 1.0], invalid=2)
    metrics = {
        "mean": NormalAngleMean(),
        "median": NormalAngleMedian(),
        "hist": NormalAngleMedian(bins=18_000),
        "w11": NormalWithin(11.25),
        "w22": NormalWithin(22.5),
        "w30": NormalWithin(30),
    }
    for m in metrics.values():
        m.update(pred[..., :2], target[..., :2])
        m.update(pred[..., 2:], target[..., 2:])
    assert metrics["mean"].compute() == pytest.approx(33.0, abs=1e-4)
    assert metrics["median"].compute() == pytest.approx(20.0, abs=1e-4)
    assert metrics["hist"].compute() == pytest.approx(20.0, abs=180 / 18_000)
    assert metrics["w11"].compute() == pytest.approx(2 / 5)
    assert metrics["w22"].compute() == pytest.approx(3 / 5)
    assert metrics["w30"].compute() == pytest.approx(3 / 5)
    assert metrics["w11"].name == "within_11.25"


def test_normal_median_even_count_and_mask():
    pred, target = _normals([0.0, 10.0, 20.0, 45.0, 90.0], [1.0] * 5)
    m = NormalAngleMedian()
    m.update(pred, target, mask=t([[[True, True, True, True, False]]]))
    assert m.compute() == pytest.approx(15.0, abs=1e-4)  # mean of the middle two (10, 20)
    m2 = NormalAngleMean()
    m2.update(pred, target, mask=t([False]))
    assert math.isnan(m2.compute())
    m3 = NormalWithin(11.25)  # a (N, 1, H, W) pixel mask works too
    m3.update(pred, target, mask=t([[[[False, True, True, True, True]]]]))
    assert m3.compute() == pytest.approx(1 / 4)  # 10° only, among 10, 20, 45, 90


def test_normal_angles_in_flat_layout():
    m = NormalAngleMean()
    m.update(t([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]), t([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert m.compute() == pytest.approx(90.0, abs=1e-4)  # (0 + 180) / 2
