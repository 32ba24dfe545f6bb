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


def _sp(x: float) -> float:
    """softplus: -log sigmoid(-x), the cost of a negative pixel at logit x."""
    return math.log1p(math.exp(x))


def test_balanced_saliency_loss_weights_by_the_batch_frequencies() -> None:
    """One positive in four pixels: w = 3/4 for the positive, 1/4 for each negative, mean over
    the four pixels; the gradient of the positive pixel is -w (1 - sigmoid) / 4."""
    from mtlkit.data._dense_tasks import BalancedBCELoss

    pred = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    loss = BalancedBCELoss(None)(pred, target)
    hand = (0.75 * _sp(-2.0) + 0.25 * (_sp(-1.0) + _sp(0.0) + _sp(3.0))) / 4
    assert loss.item() == pytest.approx(hand, rel=1e-6)  # 0.277236
    assert hand == pytest.approx(0.277236, abs=1e-6)
    loss.backward()
    sig2 = 1 / (1 + math.exp(-2.0))
    assert pred.grad[0, 0, 0, 0].item() == pytest.approx(-0.75 * (1 - sig2) / 4, rel=1e-5)
    sig3 = 1 / (1 + math.exp(-3.0))
    assert pred.grad[0, 0, 1, 1].item() == pytest.approx(0.25 * sig3 / 4, rel=1e-5)


def test_balanced_saliency_loss_pools_the_batch_not_each_map() -> None:
    """Maps with 1/4 and 2/4 positives: one w = 5/8 for the batch (3 positives in 8), not
    HED's per-image 3/4 and 1/2. Logit 0 everywhere: (3 (5/8) + 5 (3/8)) log 2 / 8."""
    from mtlkit.data._dense_tasks import BalancedBCELoss

    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[1.0, 1.0, 0.0, 0.0]]]])
    loss = BalancedBCELoss(None)(torch.zeros(2, 1, 1, 4), target)
    assert loss.item() == pytest.approx(30 / 64 * math.log(2), rel=1e-6)  # 0.324913
    per_image = ((0.75 + 3 * 0.25) + (2 * 0.5 + 2 * 0.5)) * math.log(2) / 8
    assert loss.item() != pytest.approx(per_image)


def test_balanced_saliency_loss_skips_unlabelled_pixels_and_maps() -> None:
    """A masked-out map (all positive, NaN in one pixel) changes neither the frequencies nor
    the mean; a per-pixel mask drops a pixel from both."""
    from mtlkit.data._dense_tasks import BalancedBCELoss

    loss = BalancedBCELoss(None)
    pred = torch.tensor([[[[2.0, -1.0, 0.0, 3.0]]], [[[5.0, 5.0, -5.0, 0.0]]]],
                        requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[1.0, 1.0, 1.0, math.nan]]]])
    hand = (0.75 * _sp(-2.0) + 0.25 * (_sp(-1.0) + _sp(0.0) + _sp(3.0))) / 4
    value = loss(pred, target, torch.tensor([True, False]))
    assert value.item() == pytest.approx(hand, rel=1e-6)
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[1].eq(0).all()
    # drop the logit-3 negative: 1 positive in 3 labelled pixels, w = 2/3, mean over 3
    pixels = torch.tensor([[[[True, True, True, False]]], [[[False] * 4]]])
    hand3 = (2 / 3 * _sp(-2.0) + 1 / 3 * (_sp(-1.0) + _sp(0.0))) / 3
    assert loss(pred, target, pixels).item() == pytest.approx(hand3, rel=1e-6)


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_balanced_saliency_loss_on_one_class_batches_is_zero_and_finite(value) -> None:
    """All positive (w = 0) or all negative (w = 1): the one class present is weighted 0, so the
    loss and its gradient are exactly 0, never NaN; no labelled pixel also gives 0."""
    from mtlkit.data._dense_tasks import BalancedBCELoss

    pred = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]], requires_grad=True)
    loss = BalancedBCELoss(None)(pred, torch.full((1, 1, 2, 2), value))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad.eq(0).all()
    none = BalancedBCELoss(None)(pred, torch.full((1, 1, 2, 2), value), torch.tensor([False]))
    assert none.item() == 0.0 and none.requires_grad


def test_saliency_task_uses_the_batch_balanced_loss() -> None:
    from mtlkit.data._dense_tasks import BalancedBCELoss, saliency_task
    from mtlkit.data._pascal import pascal_tasks

    (sal,) = pascal_tasks(["sal"])
    assert sal.loss == BalancedBCELoss(None) and saliency_task().loss.pos_weight is None
    assert saliency_task(pos_weight=0.9).loss == BalancedBCELoss(0.9)
    for bad in (0.0, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="pos_weight must be a number in"):
            BalancedBCELoss(bad)  # type: ignore[arg-type]
