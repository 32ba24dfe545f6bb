"""Tasks: constructors, masked losses (fully masked batches included), validation, prior loss."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from mtlkit.metrics import MAE
from mtlkit.tasks import Task, prior_loss


def _grad(loss: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, pred)
    return g


# ---------------------------------------------------------------- constructors
def test_constructors_outputs_metrics_and_directions():
    cases = {
        Task.classification("c", 10): ("classification", 10, "accuracy", {"accuracy", "f1"}),
        Task.classification("b", 2): ("classification", 2, "accuracy", {"accuracy", "f1", "auc"}),
        Task.regression("r", dim=3): ("regression", 3, "mae", {"mae", "rmse"}),
        Task.multilabel("m", 40): ("multilabel", 40, "accuracy", {"accuracy", "f1"}),
        Task.segmentation("s", 13): ("segmentation", 13, "miou", {"miou", "pixel_acc"}),
        Task.depth("d"): ("depth", 1, "abs_err", {"abs_err", "rel_err"}),
        Task.normals("n"): (
            "normals",
            3,
            "mean_angle",
            {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"},
        ),
    }
    for task, (kind, outputs, primary, names) in cases.items():
        assert (task.kind, task.num_outputs, task.primary) == (kind, outputs, primary)
        assert set(task.metrics()) == names
    assert Task.depth("d").higher_is_better == {"d/abs_err": False, "d/rel_err": False}
    assert Task.normals("n").higher_is_better["n/within_30"] is True


def test_metrics_are_fresh_on_every_call_and_tasks_pickle():
    task = Task.segmentation("seg", 5)
    assert task.metrics()["miou"] is not task.metrics()["miou"]
    clone = pickle.loads(pickle.dumps(task))
    assert clone == task and clone.loss.ignore_index == -1


def test_task_validation_errors():
    with pytest.raises(ValueError, match="without '/'"):
        Task.regression("a/b")
    with pytest.raises(ValueError, match="primary metric 'acc' is not one of"):
        Task.classification("c", 3, primary="acc")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        Task.classification("c", 1)
    shared = MAE()
    with pytest.raises(ValueError, match="same 'mae' instance twice"):
        Task("r", Task.regression("r").loss, lambda: {"mae": shared}, "mae", "regression")
    with pytest.raises(ValueError, match="kind must be one of"):
        Task("r", Task.regression("r").loss, lambda: {"mae": MAE()}, "mae", "ranking")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind must be 'mse' or 'l1'"):
        Task.regression("r", loss="huber")  # type: ignore[arg-type]


# ---------------------------------------------------------------- masked losses
def test_classification_loss_mask_equals_loss_on_labelled_rows():
    pred = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, 3, -1, 2, 1])  # -1: an unlabelled sample
    mask = torch.tensor([True, True, False, True, False])
    loss = Task.classification("c", 4).loss(pred, target, mask)
    ref = F.cross_entropy(pred[mask], target[mask])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    g = _grad(loss, pred)
    assert torch.all(g[~mask] == 0) and torch.all(g[mask].abs().sum(1) > 0)


@pytest.mark.parametrize(
    ("task", "pred_shape", "target"),
    [
        (Task.classification("c", 3), (4, 3), torch.tensor([0, 1, 2, 0])),
        (Task.regression("r"), (4, 1), torch.tensor([1.0, math.nan, 2.0, 3.0])),
        (Task.multilabel("m", 2), (4, 2), torch.ones(4, 2)),
        (Task.segmentation("s", 3), (4, 3, 2, 2), torch.zeros(4, 2, 2, dtype=torch.long)),
        (Task.depth("d"), (4, 1, 2, 2), torch.ones(4, 1, 2, 2)),
        (Task.normals("n"), (4, 3, 2, 2), torch.ones(4, 3, 2, 2)),
    ],
    ids=lambda v: v.kind if isinstance(v, Task) else None,
)
def test_fully_masked_batch_is_a_differentiable_zero(task, pred_shape, target):
    pred = torch.randn(pred_shape, requires_grad=True)
    loss = task.loss(pred, target, torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    g = _grad(loss, pred)
    assert torch.isfinite(g).all() and torch.all(g == 0)


def test_regression_loss_masks_nan_targets_and_squeezes_head_output():
    pred = torch.tensor([[1.0], [5.0], [2.0]], requires_grad=True)
    target = torch.tensor([0.0, math.nan, 4.0])
    mask = torch.tensor([True, False, True])
    mse = Task.regression("r").loss(pred, target, mask)
    assert mse.item() == pytest.approx((1 + 4) / 2)
    assert torch.isfinite(_grad(mse, pred)).all()
    l1 = Task.regression("r", loss="l1").loss(pred, target, mask)
    assert l1.item() == pytest.approx((1 + 2) / 2)
    with pytest.raises(ValueError, match="must match"):
        Task.regression("r").loss(torch.zeros(3), torch.zeros(3, 1))


def test_multilabel_loss_per_entry_mask():
    pred = torch.zeros(2, 2, requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([[True, False], [False, False]])
    loss = Task.multilabel("m", 2).loss(pred, target, mask)
    assert loss.item() == pytest.approx(math.log(2))  # one labelled entry, logit 0


def test_segmentation_loss_ignore_index_and_pixel_mask():
    pred = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, -1], [2, 1]]])
    mask = torch.tensor([[[True, True], [False, True]]])
    loss = Task.segmentation("s", 3).loss(pred, target, mask)
    logp = F.log_softmax(pred, 1)
    ref = -(logp[0, 0, 0, 0] + logp[0, 1, 1, 1]) / 2  # pixels (0,0) and (1,1) count
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_depth_and_normal_losses_by_hand():
    pred = torch.tensor([[[[1.0, 7.0], [4.0, 2.0]]]], requires_grad=True)
    target = torch.tensor([[[[2.0, 0.0], [1.0, 2.0]]]])  # the 0 pixel has no depth
    assert Task.depth("d").loss(pred, target).item() == pytest.approx((1 + 3 + 0) / 3)
    # normals: 0°, 90° and 180° from the target; the fourth pixel has no target
    p = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    tgt = torch.tensor([[1.0, 0.0, 0.0]] * 3 + [[0.0, 0.0, 0.0]])
    pred_n = p.T.reshape(1, 3, 2, 2).clone().requires_grad_(True)
    tgt_n = tgt.T.reshape(1, 3, 2, 2)
    loss = Task.normals("n").loss(pred_n, tgt_n)
    assert loss.item() == pytest.approx((0 + 1 + 2) / 3, abs=1e-6)
    assert torch.isfinite(_grad(loss, pred_n)).all()


# ---------------------------------------------------------------- prior loss
def test_prior_loss_by_hand():
    c = Task.classification("c", 3)
    # frequencies 1/2, 1/4, 1/4
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert prior_loss(c, torch.tensor([0, 0, 1, 2])) == pytest.approx(expected)
    assert prior_loss(
        c, torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 1, 1, 1, 0]).bool()
    ) == pytest.approx(expected)
    assert prior_loss(Task.regression("r"), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        1.25
    )
    assert prior_loss(
        Task.regression("r", loss="l1"), torch.tensor([1.0, 2.0, 3.0, 10.0])
    ) == pytest.approx(
        (1.0 + 0.0 + 1.0 + 8.0) / 4,
        rel=1e-6,  # any median in [2, 3] gives 10 / 4
    )
    m = Task.multilabel("m", 2)

    def h(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert prior_loss(m, labels) == pytest.approx((h(0.5) + h(0.25)) / 2)
    seg = Task.segmentation("s", 3)
    assert prior_loss(seg, torch.tensor([[[0, 1], [-1, -1]]])) == pytest.approx(math.log(2))
    d = torch.tensor([[[[1.0, 2.0], [0.0, 6.0]]]])  # valid 1, 2, 6; median 2
    assert prior_loss(Task.depth("d"), d) == pytest.approx((1 + 0 + 4) / 3)
    n = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]).T.reshape(1, 3, 2, 1)
    assert prior_loss(Task.normals("n"), n) == pytest.approx(1 - math.sqrt(0.5))  # |(1/2, 1/2, 0)|


def test_prior_loss_is_the_loss_of_the_best_constant_prediction():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    task = Task.classification("c", 5)
    freq = torch.bincount(labels, minlength=5).float() / 200
    logits = freq.log().expand(200, 5)
    assert task.loss(logits, labels).item() == pytest.approx(prior_loss(task, labels), rel=1e-5)
    y = torch.randn(200, 3, generator=g) * torch.tensor([1.0, 10.0, 100.0])
    reg = Task.regression("r", dim=3)
    assert reg.loss(y.mean(0).expand(200, 3), y).item() == pytest.approx(
        prior_loss(reg, y), rel=1e-5
    )
    with pytest.raises(ValueError, match="no labelled target"):
        prior_loss(task, labels, torch.zeros(200, dtype=torch.bool))


# ---------------------------------------------------------------- normals losses
def _normals_map() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2 x 2 normals map: pixel (0,0) exact, (0,1) 45 degrees off, (1,0) has no label (zero
    target), (1,1) points the wrong way and is masked out."""
    pred = torch.tensor([[[0.0, 1.0], [0.0, 0.0]],      # x
                         [[0.0, 1.0], [2.0, -1.0]],     # y
                         [[3.0, 0.0], [0.0, 0.0]]])     # z
    target = torch.tensor([[[0.0, 1.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 1.0]],
                           [[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    return pred[None].requires_grad_(True), target[None], mask


def test_normals_l1_loss_by_hand_with_ignored_pixels():
    from mtlkit.tasks import NormalL1Loss

    pred, target, mask = _normals_map()
    r = 1 / math.sqrt(2)
    # (0,0): |(0,0,1) - (0,0,1)| = 0; (0,1): |(r, r, 0) - (1, 0, 0)| = (1 - r + r + 0) / 3 = 1/3;
    # (1,0): zero target, not counted; (1,1): masked out (else |(0,-1,0) - (0,1,0)| / 3 = 2/3)
    loss = Task.normals("n", loss="l1").loss(pred, target, mask)
    assert loss.item() == pytest.approx((0 + 1 / 3) / 2)
    assert NormalL1Loss()(pred, target).item() == pytest.approx((0 + 1 / 3 + 2 / 3) / 3)
    g = _grad(loss, pred)
    assert g[0, :, 1, 0].eq(0).all() and g[0, :, 1, 1].eq(0).all()  # ignored pixels: no gradient
    assert g[0, :, 0, 1].abs().sum() > 0
    # the cosine loss on the same map: 1 - cos 45 degrees at (0,1) only
    cos = Task.normals("n").loss(pred, target, mask)
    assert cos.item() == pytest.approx((0 + 1 - r) / 2)
    # every pixel ignored: an exact zero, still attached to the prediction
    none = Task.normals("n", loss="l1").loss(pred, target, torch.zeros_like(mask))
    assert none.item() == 0 and none.requires_grad
    with pytest.raises(ValueError, match="normals loss must be one of"):
        Task.normals("n", loss="l2")
