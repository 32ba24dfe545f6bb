"""Binary dense-map metrics of the dense-prediction survey: edge odsF, saliency maxF, depth RMSE.

Both F-measures sweep ``thresholds`` evenly spaced probabilities ``k / (T + 1)``,
``k = 1..T`` (99 by default, as the BSDS boundary benchmark), and keep per-threshold sums, so
batches and ranks accumulate exactly. Predictions are logits (``logits=True``, the models'
raw outputs; a sigmoid is applied) or probabilities. Targets are binary maps (a value > 0.5
is positive); ``mask`` (per sample or per pixel) removes pixels from both maps. They run on
the host (SciPy): one device-to-host copy per batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from mtlkit.metrics._base import Metric
from mtlkit.metrics._depth import _DepthError
from mtlkit.metrics._utils import expand_mask


def _check_thresholds(thresholds: int) -> np.ndarray:
    if isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 1:
        raise ValueError(f"thresholds must be an int >= 1, got {thresholds!r}")
    return np.arange(1, thresholds + 1, dtype=np.float64) / (thresholds + 1)


def _maps(
    pred: Tensor, target: Tensor, mask: Tensor | None, logits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W)`` probabilities and boolean targets, masked pixels zeroed in both."""
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (N, H, W) "
            "or (N, 1, H, W) binary maps"
        )
    prob = torch.sigmoid(pred.double()) if logits else pred.double()
    positive = target > 0.5
    valid = expand_mask(mask[:, 0] if mask is not None and mask.dim() == 4 else mask,
                        target.shape)
    if valid is not None:
        prob = torch.where(valid, prob, torch.zeros_like(prob))
        positive = positive & valid
    return prob.cpu().numpy(), positive.cpu().numpy()


def _at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold ``tau_k``, the number of ``values >= tau_k``."""
    bucket = np.searchsorted(thresholds, values.ravel(), side="right")  # thresholds <= value
    counts = np.bincount(bucket, minlength=len(thresholds) + 1)
    return np.cumsum(counts[::-1])[::-1][1:]


def _disk(radius: float) -> np.ndarray:
    r = math.floor(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= radius**2


class EdgeF(Metric):
    """Edge detection odsF: the F-measure at the optimal dataset scale (one threshold for the
    whole split), with boundary matching tolerance ``tolerance`` x image diagonal.

    As in the BSDS benchmark (Martin, Fowlkes, Malik, TPAMI 2004; Arbeláez et al., TPAMI 2011)
    used by the dense-prediction survey (Vandenhende et al. 2021, arXiv:2004.13379) with
    ``tolerance = 0.0075``. At each threshold ``tau``: a predicted edge pixel (``p >= tau``)
    is correct when a ground-truth edge pixel lies within distance
    ``d = tolerance * sqrt(H^2 + W^2)``; a ground-truth edge pixel is recalled when a
    predicted one lies within ``d``. Over the split, ``P = correct / predicted``,
    ``R = recalled / ground truth``, ``F = 2PR / (P + R)``; odsF is the largest ``F``.

    .. note:: Matching here is by distance, not the benchmark's one-to-one (bipartite)
       assignment, so one predicted pixel may recall several ground-truth pixels; on thin
       (one-pixel) edge maps the two agree up to such ties. Predictions are not thinned
       (the benchmark code applies non-maximum suppression beforehand when asked).

    Args:
        tolerance: the matching distance as a fraction of the image diagonal.
        thresholds: how many thresholds to sweep.
        logits: whether predictions are logits (else probabilities in [0, 1]).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import EdgeF
        >>> gt = torch.zeros(1, 1, 5, 5); gt[..., 2] = 1           # a vertical edge
        >>> pred = torch.zeros(1, 1, 5, 5); pred[..., 3] = 0.9     # one pixel to the right
        >>> m = EdgeF(tolerance=0.0075, logits=False); m.update(pred, gt); m.compute()
        0.0
        >>> m = EdgeF(tolerance=0.2, logits=False); m.update(pred, gt); m.compute()  # d = 1.41
        1.0
    """

    name = "odsF"
    higher_is_better = True

    def __init__(self, tolerance: float = 0.0075, thresholds: int = 99, logits: bool = True):
        super().__init__()
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            0 <= tolerance < math.inf
        ):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.thresholds = _check_thresholds(thresholds)
        self.logits = bool(logits)
        t = len(self.thresholds)
        # per threshold: correct predicted pixels, predicted pixels, recalled gt pixels, gt pixels
        self.add_state("counts", torch.zeros(t, 4, dtype=torch.float64))

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        probs, positives = _maps(pred, target, mask, self.logits)
        counts = np.zeros((len(self.thresholds), 4))
        for p, gt in zip(probs, positives):
            d = self.tolerance * math.hypot(*p.shape)
            if gt.any():
                near_gt = ndimage.distance_transform_edt(~gt) <= d
            else:
                near_gt = np.zeros_like(gt)
            best_near = ndimage.grey_dilation(p, footprint=_disk(d), mode="constant", cval=0.0)
            counts[:, 0] += _at_least(p[near_gt], self.thresholds)
            counts[:, 1] += _at_least(p, self.thresholds)
            counts[:, 2] += _at_least(best_near[gt], self.thresholds)
            counts[:, 3] += gt.sum()
        self._add("counts", torch.from_numpy(counts))

    def curve(self) -> tuple[Tensor, Tensor]:
        """Precision and recall at every threshold (0 where undefined)."""
        c = self._get("counts")
        precision = torch.where(c[:, 1] > 0, c[:, 0] / c[:, 1].clamp_min(1), 0.0)
        recall = torch.where(c[:, 3] > 0, c[:, 2] / c[:, 3].clamp_min(1), 0.0)
        return precision, recall

    def _compute(self) -> Tensor | float:
        return _max_f(*self.curve(), beta2=1.0)


def _max_f(precision: Tensor, recall: Tensor, beta2: float) -> float:
    den = beta2 * precision + recall
    f = torch.where(den > 0, (1 + beta2) * precision * recall / den.clamp_min(1e-300), 0.0)
    return float(f.max())


class SaliencyMaxF(Metric):
    """Saliency maxF: the largest F-beta over thresholds, ``beta^2 = 0.3``.

    ``F = (1 + beta^2) P R / (beta^2 P + R)`` (Achanta, Hemami, Estrada, Süsstrunk, CVPR 2009),
    with precision and recall of the thresholded map computed per image and averaged over the
    images at each threshold (the convention of Borji, Cheng, Jiang, Li, TIP 2015,
    arXiv:1501.02741), as reported for saliency on PASCAL-Context in the dense-prediction
    survey (Vandenhende et al. 2021, arXiv:2004.13379). An image with no predicted positive
    has precision 0; one with no salient pixel has recall 0.

    Args:
        beta2: ``beta^2``.
        thresholds: how many thresholds to sweep.
        logits: whether predictions are logits (else probabilities).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import SaliencyMaxF
        >>> gt = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
        >>> pred = torch.tensor([[[0.9, 0.4, 0.3, 0.0]]])
        >>> m = SaliencyMaxF(logits=False); m.update(pred, gt)
        >>> round(m.compute(), 4)  # tau <= 0.4: P = 1, R = 1 -> F = 1
        1.0
    """

    name = "maxF"
    higher_is_better = True

    def __init__(self, beta2: float = 0.3, thresholds: int = 99, logits: bool = True):
        super().__init__()
        if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not (
            0 < beta2 < math.inf
        ):
            raise ValueError(f"beta2 must be a positive number, got {beta2!r}")
        self.beta2 = float(beta2)
        self.thresholds = _check_thresholds(thresholds)
        self.logits = bool(logits)
        t = len(self.thresholds)
        self.add_state("precision_sum", torch.zeros(t, dtype=torch.float64))  # sum over images
        self.add_state("recall_sum", torch.zeros(t, dtype=torch.float64))
        self.add_state("images", torch.zeros((), dtype=torch.float64))

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        probs, positives = _maps(pred, target, mask, self.logits)
        psum = np.zeros(len(self.thresholds))
        rsum = np.zeros(len(self.thresholds))
        for p, gt in zip(probs, positives):
            predicted = _at_least(p, self.thresholds)
            hits = _at_least(p[gt], self.thresholds)
            psum += np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
            rsum += hits / gt.sum() if gt.any() else 0.0
        self._add("precision_sum", torch.from_numpy(psum))
        self._add("recall_sum", torch.from_numpy(rsum))
        self._add("images", torch.tensor(float(len(probs)), dtype=torch.float64))

    def _compute(self) -> Tensor | float:
        n = self._get("images")
        if float(n) == 0:
            return float("nan")
        return _max_f(self._get("precision_sum") / n, self._get("recall_sum") / n, self.beta2)


class DepthRMSE(_DepthError):
    """Root mean squared depth error over the valid pixels of the split (``target > 0`` and
    ``mask``), the depth metric of the dense-prediction survey on NYUD-v2
    (Vandenhende et al. 2021, arXiv:2004.13379).

    .. note:: Pooled over every valid pixel of the split, not a mean of per-image RMSEs.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import DepthRMSE
        >>> m = DepthRMSE()
        >>> m.update(torch.tensor([[[1.0, 5.0, 9.0]]]), torch.tensor([[[2.0, 2.0, 0.0]]]))
        >>> round(m.compute(), 6)  # sqrt((1 + 9) / 2), the 0-depth pixel skipped
        2.236068
    """

    name = "rmse"

    def _error(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).square()

    def _compute(self) -> Tensor | float:
        mean = super()._compute()
        return mean if isinstance(mean, float) else mean.sqrt()
