"""The tasks of the dense-prediction survey that :class:`~mtlkit.tasks.Task` has no constructor
for: edge detection and saliency (binary maps, class-balanced cross-entropy), and depth with
RMSE."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.metrics import AbsErr, DepthRMSE, EdgeF, RelErr, SaliencyMaxF, delta_m
from mtlkit.metrics._utils import check_tensor, expand_mask
from mtlkit.tasks import DepthL1Loss, MetricSet, Task, masked_mean


@dataclass(frozen=True)
class BalancedBCELoss:
    """Class-balanced binary cross-entropy on logits:
    ``-(w y log p + (1 - w)(1 - y) log(1 - p))``, mean over labelled pixels.

    The weighting of HED (Xie, Tu, *Holistically-Nested Edge Detection*, ICCV 2015,
    arXiv:1504.06375), as the dense-prediction survey (Vandenhende et al., TPAMI 2021,
    arXiv:2004.13379) trains its binary maps:

    - ``pos_weight`` a number: a fixed ``w`` (the survey's edge loss: ``w = 0.95``);
    - ``pos_weight=None``: ``w`` is the fraction of negative labelled pixels in the batch
      (all its maps pooled; under torchrun, the batch of each process), so positives are
      weighted by the negatives' frequency and negatives by the positives' (HED's
      class-balanced loss; the survey's saliency loss).
      ``w`` is a constant of the labels (no gradient flows through it). A batch whose
      labelled pixels are all positive has ``w = 0``, all negative ``w = 1``: the one class
      present gets weight 0, so the loss is exactly 0 with a zero gradient (finite, no
      NaN), as HED's formula gives; a batch with no labelled pixel also gives 0.

    ``mask`` (``(N,)`` per map or the target's shape per pixel) marks the labelled pixels:
    the others count neither in the mean nor in the frequencies. Targets are 0/1 (a soft
    target counts as its value).

    Example:
        >>> import torch
        >>> from mtlkit.data._dense_tasks import BalancedBCELoss
        >>> pred = torch.zeros(1, 1, 1, 2, requires_grad=True)         # p = 0.5 everywhere
        >>> loss = BalancedBCELoss(0.95)(pred, torch.tensor([[[[1.0, 0.0]]]]))
        >>> round(loss.item(), 4)  # (0.95 log 2 + 0.05 log 2) / 2
        0.3466
        >>> y = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])  # 1 positive in 4: w = 3/4
        >>> round(BalancedBCELoss(None)(torch.zeros(1, 1, 1, 4), y).item(), 4)
        0.2599
        >>> # that is (3/4 log 2 + 3 x 1/4 log 2) / 4
    """

    pos_weight: float | None = 0.95

    def __post_init__(self) -> None:
        w = self.pos_weight
        if w is None:
            return
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < 1:
            raise ValueError(f"pos_weight must be a number in (0, 1) or None (per-batch "
                             f"frequencies), got {w!r}")

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        check_tensor(pred, "pred")
        check_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred has shape {tuple(pred.shape)} but target {tuple(target.shape)}; "
                "they must match"
            )
        valid = expand_mask(mask, target.shape)
        t = target.detach().to(pred.dtype)
        if valid is not None:  # unlabelled pixels: no loss, no count (and no NaN from them)
            t = torch.where(valid, t, torch.zeros_like(t))
        w: float | Tensor
        if self.pos_weight is None:  # counted in float32 (exact to 2^24 pixels), even under amp
            positives = t.sum(dtype=torch.float32)
            labelled = (valid.sum(dtype=torch.float32) if valid is not None
                        else positives.new_tensor(float(t.numel())))
            w = (1 - positives / labelled.clamp_min(1)).to(pred.dtype)
        else:
            w = self.pos_weight
        per_pixel = -(w * t * F.logsigmoid(pred) + (1 - w) * (1 - t) * F.logsigmoid(-pred))
        return masked_mean(per_pixel, valid)


def edge_task(name: str = "edge", *, pos_weight: float = 0.95, tolerance: float = 0.0075,
              thresholds: int = 99) -> Task:
    """Edge detection as in the survey: :class:`BalancedBCELoss` on ``(N, 1, H, W)`` logits,
    binary ``(N, 1, H, W)`` targets; metric ``odsF`` (:class:`~mtlkit.metrics.EdgeF`).

    Example:
        >>> from mtlkit.data._dense_tasks import edge_task
        >>> edge_task().primary
        'odsF'
    """
    if not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be finite, got {tolerance!r}")
    metrics = MetricSet.of(("odsF", EdgeF, {"tolerance": tolerance, "thresholds": thresholds}))
    return Task(name, BalancedBCELoss(pos_weight), metrics, "odsF", "binary_map", 1)


def saliency_task(name: str = "sal", *, pos_weight: float | None = None,
                  thresholds: int = 99) -> Task:
    """Saliency as in the dense-prediction survey (Vandenhende et al., TPAMI 2021,
    arXiv:2004.13379): :class:`BalancedBCELoss` on ``(N, 1, H, W)`` logits against binary
    ``(N, 1, H, W)`` targets, by default (``pos_weight=None``) balanced by each batch's label
    frequencies (HED's class-balanced cross-entropy, Xie and Tu, ICCV 2015, arXiv:1504.06375);
    a number gives a fixed positive weight instead. Metric ``maxF``
    (:class:`~mtlkit.metrics.SaliencyMaxF`).

    Example:
        >>> from mtlkit.data._dense_tasks import saliency_task
        >>> task = saliency_task()
        >>> task.num_outputs, task.loss.pos_weight
        (1, None)
    """
    metrics = MetricSet.of(("maxF", SaliencyMaxF, {"thresholds": thresholds}))
    return Task(name, BalancedBCELoss(pos_weight), metrics, "maxF", "binary_map", 1)


def depth_rmse_task(name: str = "depth") -> Task:
    """Depth with L1 loss (valid pixels ``> 0``) and RMSE as the primary metric, as the survey
    reports NYUD-v2 depth; ``abs_err`` and ``rel_err`` are kept beside it.

    Example:
        >>> from mtlkit.data._dense_tasks import depth_rmse_task
        >>> sorted(depth_rmse_task().metrics())
        ['abs_err', 'rel_err', 'rmse']
    """
    metrics = MetricSet.of(("rmse", DepthRMSE, {}), ("abs_err", AbsErr, {}), ("rel_err", RelErr, {}))
    return Task(name, DepthL1Loss(), metrics, "rmse", "depth", 1)


def survey_delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float],
                   tasks: Sequence[Task]) -> float:
    """Δm% as the dense-prediction survey defines it (Vandenhende et al. 2021,
    arXiv:2004.13379, after Maninis et al. 2019): the mean over tasks of the sign-corrected
    relative change of each task's one reported metric (its ``primary``: mIoU, RMSE, mean
    angle, odsF, maxF), against the single-task baselines.

    ``mtlkit compare`` orders its table by this Δm% (``delta_m_per_task`` in ``results.json``)
    when the experiment sets ``delta_m: per_task``, as the survey configs do; by default it
    averages over every metric a task has.

    Example:
        >>> from mtlkit.data._dense_tasks import depth_rmse_task, edge_task, survey_delta_m
        >>> tasks = [depth_rmse_task("depth"), edge_task("edge")]
        >>> m = {"depth/rmse": 0.54, "depth/abs_err": 9.0, "edge/odsF": 0.77}
        >>> b = {"depth/rmse": 0.60, "depth/abs_err": 1.0, "edge/odsF": 0.70}
        >>> round(survey_delta_m(m, b, tasks), 6)  # (+10% + 10%) / 2; abs_err is not used
        10.0
    """
    keys = [f"{t.name}/{t.primary}" for t in tasks]
    missing = [k for k in keys if k not in metrics or k not in baseline]
    if missing:
        raise ValueError(f"survey_delta_m: no value for {missing}")
    higher = {f"{t.name}/{t.primary}": bool(t.metrics()[t.primary].higher_is_better)
              for t in tasks}
    return delta_m({k: metrics[k] for k in keys}, {k: baseline[k] for k in keys}, higher)
