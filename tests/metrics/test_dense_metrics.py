"""Edge odsF and saliency maxF against values worked by hand on tiny maps; depth RMSE."""

from __future__ import annotations

import math

import pytest
import torch

from mtlkit.metrics import DepthRMSE, EdgeF, SaliencyMaxF


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p / (1 - p))


def _two_edge_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Image A: edge on column 1, predicted one column to the right (0.95) plus a false pixel
    two columns away (0.55). Image B: edge on column 1, predicted exactly but weakly (0.45).
    Both 4x4 (diagonal 5.657)."""
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, 0, :, 1] = 1
    pred = torch.full((2, 1, 4, 4), 0.01)
    pred[0, 0, :, 2] = 0.95
    pred[0, 0, 0, 3] = 0.55
    pred[1, 0, :, 1] = 0.45
    return pred, gt


def test_odsf_with_a_tolerance_of_one_pixel_matches_the_shifted_edge() -> None:
    """d = 0.2 x 5.657 = 1.13 px. tau <= 0.45: A predicts 5 (4 correct, the far pixel is 2 px
    away), B 4 (all correct); every gt pixel recalled: P = 8/9, R = 8/8, F = 16/17.
    0.45 < tau <= 0.95: P = 4/4 or 4/5, R = 4/8: F <= 2/3. odsF = 16/17."""
    pred, gt = _two_edge_images()
    m = EdgeF(tolerance=0.2)
    m.update(_logit(pred), gt)
    assert m.compute() == pytest.approx(16 / 17, abs=1e-12)


def test_odsf_with_the_survey_tolerance_needs_exact_positions_on_a_tiny_map() -> None:
    """d = 0.0075 x 5.657 = 0.04 px: A's shifted edge is all wrong. tau <= 0.45: P = 4/9,
    R = 4/8, F = 8/17; above, no correct pixel (F = 0)."""
    pred, gt = _two_edge_images()
    m = EdgeF()  # tolerance 0.0075, logits
    m.update(_logit(pred), gt)
    assert m.compute() == pytest.approx(8 / 17, abs=1e-12)
    # Accumulating image by image gives the same dataset-level optimum (one threshold).
    m2 = EdgeF()
    m2.update(_logit(pred[:1]), gt[:1])
    m2.update(_logit(pred[1:]), gt[1:])
    assert m2.compute() == pytest.approx(8 / 17, abs=1e-12)


def test_odsf_default_tolerance_is_0_0075_of_the_diagonal() -> None:
    """200 x 200: d = 0.0075 x 282.8 = 2.12 px; an edge shifted by 2 px matches, by 3 not."""
    gt = torch.zeros(1, 200, 200)
    gt[0, :, 100] = 1
    for shift, expected in ((2, 1.0), (3, 0.0)):
        pred = torch.zeros(1, 200, 200)
        pred[0, :, 100 + shift] = 0.9
        m = EdgeF(logits=False)
        m.update(pred, gt)
        assert m.compute() == pytest.approx(expected), shift


def test_odsf_masks_and_degenerate_maps_stay_finite() -> None:
    pred, gt = _two_edge_images()
    m = EdgeF(tolerance=0.2)
    # masking image B leaves image A: tau <= 0.55: P = 4/5, R = 1 -> 8/9; above: P = R = 1
    m.update(_logit(pred), gt, torch.tensor([True, False]))
    assert m.compute() == pytest.approx(1.0)
    empty = EdgeF()
    empty.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))  # no edge, no prediction
    assert empty.compute() == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        EdgeF(tolerance=-1)
    with pytest.raises(ValueError, match="binary maps"):
        EdgeF().update(torch.zeros(1, 4, 4), torch.zeros(1, 5, 4))


def test_maxf_weighs_precision_with_beta_squared_0_3() -> None:
    """gt [1, 1, 0, 0], p [0.95, 0.45, 0.65, 0.05]. tau in (0.05, 0.45]: P = 2/3, R = 1,
    F = 1.3 x 2/3 / (0.2 + 1) = 0.7222; tau in (0.65, 0.95]: P = 1, R = 1/2,
    F = 0.65 / 0.8 = 0.8125 (the maximum; with beta^2 = 1 the first would win, 0.8)."""
    gt = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    p = torch.tensor([[[0.95, 0.45, 0.65, 0.05]]])
    m = SaliencyMaxF()
    m.update(_logit(p), gt)
    assert m.compute() == pytest.approx(0.8125)
    f1 = SaliencyMaxF(beta2=1.0)
    f1.update(_logit(p), gt)
    assert f1.compute() == pytest.approx(0.8)


def test_maxf_averages_precision_and_recall_over_images() -> None:
    """A second, perfectly predicted image (gt [0, 0, 1, 1]): at tau in (0.65, 0.95],
    P = (1 + 1) / 2, R = (1/2 + 1) / 2 = 3/4, F = 1.3 x 0.75 / 1.05 = 13/14."""
    gt = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]])
    p = torch.tensor([[[0.95, 0.45, 0.65, 0.05]], [[0.05, 0.05, 0.95, 0.95]]])
    m = SaliencyMaxF(logits=False)
    m.update(p, gt)
    assert m.compute() == pytest.approx(13 / 14)
    m2 = SaliencyMaxF(logits=False)
    m2.update(p[:1], gt[:1])
    m2.update(p[1:], gt[1:])
    assert m2.compute() == pytest.approx(13 / 14)
    assert math.isnan(SaliencyMaxF().compute())  # nothing seen


def test_depth_rmse_pools_valid_pixels_over_the_split() -> None:
    m = DepthRMSE()
    m.update(torch.tensor([[[1.0, 5.0]]]), torch.tensor([[[2.0, 2.0]]]))  # errors 1, 3
    m.update(torch.tensor([[[4.0, 7.0]]]), torch.tensor([[[2.0, 0.0]]]))  # error 2, missing
    assert m.compute() == pytest.approx(math.sqrt((1 + 9 + 4) / 3))


def test_survey_delta_m_uses_one_primary_metric_per_task() -> None:
    """semseg mIoU 0.40 -> 0.42 (+5%), normals mean angle 20 -> 21 (worse: -5%), edge odsF
    0.70 -> 0.77 (+10%), sal maxF 0.80 -> 0.80 (0): (5 - 5 + 10 + 0) / 4 = 2.5; the
    non-primary normals/median_angle is left out."""
    from mtlkit.data._dense_tasks import edge_task, saliency_task, survey_delta_m
    from mtlkit.tasks import Task

    tasks = [Task.segmentation("semseg", 21, ignore_index=255), Task.normals("normals"),
             edge_task(), saliency_task()]
    base = {"semseg/miou": 0.40, "normals/mean_angle": 20.0, "edge/odsF": 0.70,
            "sal/maxF": 0.80, "normals/median_angle": 10.0}
    mtl = {"semseg/miou": 0.42, "normals/mean_angle": 21.0, "edge/odsF": 0.77,
           "sal/maxF": 0.80, "normals/median_angle": 1.0}
    assert survey_delta_m(mtl, base, tasks) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no value for"):
        survey_delta_m({}, base, tasks)


def test_balanced_edge_loss_weights_positives_by_0_95() -> None:
    """Logit 0 (p = 1/2) on one edge and one non-edge pixel: (0.95 + 0.05) log 2 / 2; a
    confident logit 2 on the edge pixel costs 0.95 log(1 + e^-2)."""
    from mtlkit.data._dense_tasks import BalancedBCELoss
    from mtlkit.tasks import prior_loss

    loss = BalancedBCELoss()
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert loss(torch.zeros(1, 1, 1, 2), target).item() == pytest.approx(math.log(2) / 2)
    pred = torch.tensor([[[[2.0, -40.0]]]])
    assert loss(pred, target).item() == pytest.approx(0.95 * math.log1p(math.exp(-2)) / 2)
    from mtlkit.data._dense_tasks import edge_task

    # prior loss of a binary map: entropy of the positive rate (1/4 here)
    y = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert prior_loss(edge_task(), y) == pytest.approx(h)
