"""Semantic segmentation metrics from one confusion matrix: mean IoU and pixel accuracy."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.metrics._base import Metric
from mtlkit.metrics._classification import check_labels, positive_int
from mtlkit.metrics._utils import expand_mask, float_dtype

NAN = float("nan")


class _ConfusionMatrix(Metric):
    higher_is_better = True

    def __init__(
        self, num_classes: int, *, ignore_index: int | None = -1, validate_args: bool = True
    ) -> None:
        super().__init__()
        positive_int(num_classes, "num_classes", minimum=2)
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class of num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        # (C, C) pixel counts, rows = target class, columns = predicted class
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long))

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        c = self.num_classes
        if (
            pred.dim() == target.dim() + 1
            and pred.shape[1] == c
            and pred.shape[2:] == target.shape[1:]
        ):
            labels = pred.argmax(1)
        elif pred.shape == target.shape and not pred.is_floating_point():
            labels = pred.long()
        else:
            raise ValueError(
                f"pred has shape {tuple(pred.shape)} and target {tuple(target.shape)}: expected "
                f"scores (N, {c}, ...) with target (N, ...), or integer labels shaped like target"
            )
        t = target.long() if not target.is_floating_point() else target.round().long()
        valid = (
            torch.ones_like(t, dtype=torch.bool)
            if self.ignore_index is None
            else t != self.ignore_index
        )
        m = expand_mask(mask, target.shape)
        if m is not None:
            valid = valid & m
        if self.validate_args:
            check_labels(target, valid, c, "target")
            check_labels(labels, valid, c, "pred")
        idx = t[valid] * c + labels[valid]
        self._add("confmat", torch.bincount(idx, minlength=c * c).reshape(c, c))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"


class MeanIoU(_ConfusionMatrix):
    """Mean intersection over union over the classes, from a confusion matrix of the split.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, pooled over every pixel of the split (not averaged
    per image or per batch). A class absent from both targets and predictions has no IoU and is
    left out of the mean. Pixels whose target equals ``ignore_index`` (default -1, as in the MTAN
    NYUv2 files; use 255 for Cityscapes/VOC-style labels) or whose ``mask`` is False count
    nowhere.

    Args:
        num_classes: number of classes C.
        ignore_index: target value of unlabelled pixels, or None.
        validate_args: check label ranges (one host sync per batch).

    ``pred`` is ``(N, C, H, W)`` scores (argmax over C) or ``(N, H, W)`` integer labels;
    ``target`` is ``(N, H, W)``; ``mask`` is ``(N,)`` or ``(N, H, W)``.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import MeanIoU
        >>> m = MeanIoU(2)
        >>> m.update(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, -1]]))
        >>> m.compute()  # class 0: 1 / 2, class 1: 1 / 2 (the -1 pixel is ignored)
        0.5
    """

    name = "miou"

    def _compute(self) -> float | Tensor:
        cm = self._get("confmat")
        dtype = float_dtype(cm.device)
        tp = cm.diagonal().to(dtype)
        union = cm.sum(0).to(dtype) + cm.sum(1).to(dtype) - tp
        keep = union > 0
        if not bool(keep.any()):
            return NAN
        return (tp[keep] / union[keep]).mean()


class PixelAccuracy(_ConfusionMatrix):
    """Fraction of labelled pixels whose predicted class is right (same inputs as
    :class:`MeanIoU`).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import PixelAccuracy
        >>> m = PixelAccuracy(2)
        >>> m.update(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, -1]]))
        >>> round(m.compute(), 4)
        0.6667
    """

    name = "pixel_acc"

    def _compute(self) -> float | Tensor:
        cm = self._get("confmat")
        total = int(cm.sum())
        if total == 0:
            return NAN
        return cm.diagonal().sum().to(float_dtype(cm.device)) / total
