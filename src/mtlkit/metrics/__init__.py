"""Per-task metrics accumulated exactly over a split, and the multi-task gain Δm.

Every metric keeps sufficient statistics (sums and counts, a confusion matrix, or kept values
where exactness needs them), so accumulating uneven batches, or summing the states of several
ranks, gives the metric of the whole split. ``update(pred, target, mask=None)`` takes a
per-sample or per-element ``mask`` that excludes unlabelled entries.

Metrics (key, direction, state):

- :class:`Accuracy` (``accuracy``, higher): correct and total counts.
- :class:`F1` (``f1``, higher): confusion matrix, or TP/FP/FN per label.
- :class:`AUC` (``auc``, higher): kept scores and labels (grows with the data).
- :class:`MAE` (``mae``, lower) and :class:`RMSE` (``rmse``, lower): error sum and count.
- :class:`MeanIoU` (``miou``, higher) and :class:`PixelAccuracy` (``pixel_acc``, higher):
  confusion matrix.
- :class:`AbsErr` (``abs_err``, lower) and :class:`RelErr` (``rel_err``, lower): error sum
  and valid-pixel count.
- :class:`NormalAngleMean` (``mean_angle``, lower): angle sum and count.
- :class:`NormalAngleMedian` (``median_angle``, lower): kept angles (exact) or a histogram.
- :class:`NormalWithin` (``within_<t>``, higher): hits and count.
- :class:`EdgeF` (``odsF``, higher) and :class:`SaliencyMaxF` (``maxF``, higher): per-threshold
  counts; :class:`DepthRMSE` (``rmse``, lower): squared error sum and count.

:func:`delta_m` (Δm%, over every metric) and :func:`delta_p` (Δp, over tasks) give the gain
against single-task baselines; :func:`mean_rank` ranks methods with ties averaged.
"""

from mtlkit.metrics._base import Metric
from mtlkit.metrics._classification import AUC, F1, Accuracy, binary_auc
from mtlkit.metrics._delta import delta_m, delta_p, mean_rank
from mtlkit.metrics._depth import AbsErr, RelErr
from mtlkit.metrics._edges import DepthRMSE, EdgeF, SaliencyMaxF
from mtlkit.metrics._normals import NormalAngleMean, NormalAngleMedian, NormalWithin, normal_angles
from mtlkit.metrics._regression import MAE, RMSE
from mtlkit.metrics._segmentation import MeanIoU, PixelAccuracy

__all__ = [
    "AUC",
    "F1",
    "MAE",
    "RMSE",
    "AbsErr",
    "Accuracy",
    "DepthRMSE",
    "EdgeF",
    "MeanIoU",
    "Metric",
    "NormalAngleMean",
    "NormalAngleMedian",
    "NormalWithin",
    "PixelAccuracy",
    "RelErr",
    "SaliencyMaxF",
    "binary_auc",
    "delta_m",
    "delta_p",
    "mean_rank",
    "normal_angles",
]
