"""The tasks of the dense-prediction survey that :class:`~mtlkit.tasks.Task` has no constructor
for: edge detection and saliency (binary maps), and depth with RMSE."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mtlkit.metrics import AbsErr, DepthRMSE, EdgeF, RelErr, SaliencyMaxF, delta_m
from mtlkit.metrics._utils import check_tensor, expand_mask
from mtlkit.tasks import BCEWithLogitsLoss, DepthL1Loss, MetricSet, Task, masked_mean


@dataclass(frozen=True)
class BalancedBCELoss:
    """Class-balanced binary cross-entropy on logits for sparse positives (edges):
    ``-(w y log p + (1 - w)(1 - y) log(1 - p))``, mean over labelled pixels.

    The edge loss of the dense-prediction survey (Vandenhende et al. 2021, arXiv:2004.13379)
    with ``w = pos_weight = 0.95``, after the weighting of HED (Xie, Tu, ICCV 2015,
    arXiv:1504.06375).

    Example:
        >>> import torch
        >>> from mtlkit.data._dense_tasks import BalancedBCELoss
        >>> pred = torch.zeros(1, 1, 1, 2, requires_grad=True)         # p = 0.5 everywhere
        >>> loss = BalancedBCELoss(0.95)(pred, torch.tensor([[[[1.0, 0.0]]]]))
        >>> round(loss.item(), 4)  # (0.95 log 2 + 0.05 log 2) / 2
        0.3466
    """

    pos_weight: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.pos_weight < 1:
            raise ValueError(f"pos_weight must be in (0, 1), got {self.pos_weight!r}")

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        check_tensor(pred, "pred")
        check_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred has shape {tuple(pred.shape)} but target {tuple(target.shape)}; "
                "they must match"
            )
        t = target.to(pred.dtype)
        w = self.pos_weight
        per_pixel = -(w * t * F.logsigmoid(pred) + (1 - w) * (1 - t) * F.logsigmoid(-pred))
        return masked_mean(per_pixel, expand_mask(mask, target.shape))


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


def saliency_task(name: str = "sal", *, thresholds: int = 99) -> Task:
    """Saliency: binary cross-entropy on ``(N, 1, H, W)`` logits (a plain BCE: the survey's
    exact saliency loss is not reproduced); metric ``maxF`` (:class:`~mtlkit.metrics.SaliencyMaxF`).

    Example:
        >>> from mtlkit.data._dense_tasks import saliency_task
        >>> saliency_task().num_outputs
        1
    """
    metrics = MetricSet.of(("maxF", SaliencyMaxF, {"thresholds": thresholds}))
    return Task(name, BCEWithLogitsLoss(), metrics, "maxF", "binary_map", 1)


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
