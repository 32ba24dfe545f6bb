"""Surface normal metrics: angular error in degrees (mean, median, fraction within a bound)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.metrics._base import Metric
from mtlkit.metrics._classification import positive_int
from mtlkit.metrics._utils import float_dtype, pixel_mask

NAN = float("nan")


def normal_angles(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Angles in degrees between predicted and target normals at the valid pixels (1-D).

    ``pred`` and ``target`` are ``(N, 3, H, W)`` (or ``(N, 3)``); both are normalised to unit
    length, so the prediction need not be. A pixel is valid where the target is not the zero
    vector (how the NYUv2 files mark missing normals) and ``mask`` (``(N,)`` or ``(N, H, W)``)
    (or ``(N, 1, H, W)``) is True. Computed in float64 where the device has it.
    """
    if pred.shape != target.shape or target.dim() < 2 or target.shape[1] < 2:
        raise ValueError(
            f"pred and target must have the same shape (N, 3, ...), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    dtype = float_dtype(pred.device)
    p, t = pred.to(dtype), target.to(dtype)
    valid = t.square().sum(1) > 0
    valid = pixel_mask(mask, valid)
    cos = (F.normalize(p, dim=1) * F.normalize(t, dim=1)).sum(1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos[valid]))


class NormalAngleMean(Metric):
    """Mean angular error (degrees) over the valid pixels of the split.

    As reported for NYUv2 in the MTAN literature (Liu et al., CVPR 2019, arXiv:1803.10704), but
    pooled over pixels rather than averaged over per-batch means. See :func:`normal_angles` for
    inputs and validity.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import NormalAngleMean
        >>> m = NormalAngleMean()
        >>> pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
        >>> m.update(pred, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
        >>> m.compute()  # (0 + 90) / 2
        45.0
    """

    name = "mean_angle"
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64))  # summed angles (deg)
        self.add_state("count", torch.zeros((), dtype=torch.long))  # valid pixels

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        angles = normal_angles(pred, target, mask)
        self._add("total", angles.sum())
        self._add("count", torch.tensor(angles.numel(), device=angles.device))

    def _compute(self) -> Tensor | float:
        count = int(self._get("count"))
        return NAN if count == 0 else self._get("total") / count


class NormalAngleMedian(Metric):
    """Median angular error (degrees) over the valid pixels of the split.

    Exact by default: every valid pixel's angle is kept (a ``"cat"`` state, float32, 4 bytes
    per valid pixel, e.g. about 290 MB for the 654 NYUv2 test images at 288x384), and the
    median of an even count is the mean of the two middle values (as ``numpy.median``).

    With ``bins=B`` the state is instead a histogram of B equal bins over [0°, 180°] (fixed
    size, ``8 B`` bytes), and the median is interpolated linearly inside its bin, so the error
    is below ``180 / B`` degrees (0.0018° for B = 100000).

    Args:
        bins: None for the exact median, or the number of histogram bins.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import NormalAngleMedian
        >>> target = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
        >>> pred = torch.tensor([[1.0, 0, 0], [1.0, 1, 0], [0.0, 1, 0], [-1.0, 0, 0]])
        >>> m = NormalAngleMedian()
        >>> m.update(pred, target)  # angles 0, 45, 90, 180
        >>> round(m.compute(), 4)
        67.5
    """

    name = "median_angle"
    higher_is_better = False

    def __init__(self, bins: int | None = None) -> None:
        super().__init__()
        if bins is not None:
            positive_int(bins, "bins")
        self.bins = bins
        if bins is None:
            self.add_state("angles", torch.zeros(0, dtype=torch.float32), "cat")  # (n,) degrees
        else:
            self.add_state("hist", torch.zeros(bins, dtype=torch.long))  # (B,) counts over [0, 180]

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        angles = normal_angles(pred, target, mask)
        if self.bins is None:
            self._append("angles", angles)
        else:
            b = self.bins
            idx = (angles * (b / 180.0)).long().clamp(0, b - 1)
            self._add("hist", torch.bincount(idx, minlength=b))

    def _compute(self) -> float:
        if self.bins is None:
            angles = self._get("angles")
            n = angles.numel()
            if n == 0:
                return NAN
            lo = torch.kthvalue(angles, (n + 1) // 2).values.double()
            hi = torch.kthvalue(angles, n // 2 + 1).values.double()
            return float((lo + hi) / 2)
        hist = self._get("hist").double()
        n = float(hist.sum())
        if n == 0:
            return NAN
        cum = hist.cumsum(0)
        k = int(torch.searchsorted(cum, torch.tensor(n / 2, dtype=cum.dtype, device=cum.device)))
        before = float(cum[k - 1]) if k > 0 else 0.0
        width = 180.0 / self.bins
        return k * width + (n / 2 - before) / float(hist[k]) * width

    def extra_repr(self) -> str:
        return f"bins={self.bins}"


class NormalWithin(Metric):
    """Fraction of valid pixels whose angular error is below ``threshold`` degrees.

    Reported as a fraction in [0, 1] (papers print it ×100 as a percentage). The usual
    thresholds are 11.25, 22.5 and 30; ``name`` is ``"within_<threshold>"``.

    Args:
        threshold: the bound in degrees, in (0, 180].

    Example:
        >>> import torch
        >>> from mtlkit.metrics import NormalWithin
        >>> target = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
        >>> pred = torch.tensor([[1.0, 0, 0], [1.0, 1, 0], [0.0, 1, 0], [-1.0, 0, 0]])
        >>> m = NormalWithin(30.0)
        >>> m.name
        'within_30'
        >>> m.update(pred, target)  # only the 0° pixel is below 30°
        >>> m.compute()
        0.25
    """

    higher_is_better = True

    def __init__(self, threshold: float) -> None:
        super().__init__()
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 < threshold <= 180
        ):
            raise ValueError(
                f"threshold must be a number of degrees in (0, 180], got {threshold!r}"
            )
        self.threshold = float(threshold)
        self.name = f"within_{self.threshold:g}"
        self.add_state("hits", torch.zeros((), dtype=torch.long))  # pixels below the bound
        self.add_state("count", torch.zeros((), dtype=torch.long))  # valid pixels

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        angles = normal_angles(pred, target, mask)
        self._add("hits", (angles < self.threshold).sum())
        self._add("count", torch.tensor(angles.numel(), device=angles.device))

    def _compute(self) -> Tensor | float:
        count = int(self._get("count"))
        return NAN if count == 0 else self._get("hits").double() / count

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"
