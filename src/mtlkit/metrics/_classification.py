"""Classification metrics: accuracy, F1 and ROC AUC (binary, multiclass, multi-label)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlkit.metrics._base import Metric
from mtlkit.metrics._utils import expand_mask, float_dtype

NAN = float("nan")


def positive_int(value: object, arg: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise a ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")
    return value


def check_labels(labels: Tensor, valid: Tensor | None, num_classes: int | None, arg: str) -> None:
    """Raise a ValueError unless the valid ``labels`` are integers in [0, num_classes)."""
    vals = labels if valid is None else labels[valid]
    if vals.numel() == 0:
        return
    if vals.is_floating_point() and not bool(torch.all(vals == vals.round())):
        raise ValueError(f"{arg} must hold integer class labels, found non-integer values")
    lo, hi = (float(v) for v in torch.aminmax(vals.reshape(-1)))
    top = num_classes if num_classes is not None else math.inf
    if lo < 0 or hi >= top:
        bad = lo if lo < 0 else hi
        rng = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(
            f"{arg} holds label {bad:g}, outside {rng} (mark unlabelled entries with mask "
            "or ignore_index)"
        )


def single_label_prediction(
    pred: Tensor, target: Tensor, threshold: float
) -> tuple[Tensor, int | None]:
    """Predicted labels shaped like ``target``, and the number of classes ``pred`` implies.

    * ``pred`` of shape ``(N, C, ...)`` with ``C >= 2`` and ``target`` ``(N, ...)``: argmax over
      dimension 1 (``C`` classes).
    * ``pred`` floating, shaped like ``target`` (or with an extra size-1 dimension 1): one
      binary score per sample, positive when ``pred > threshold`` (2 classes).
    * ``pred`` integer, shaped like ``target``: already labels (number of classes unknown).
    """
    if pred.shape == target.shape:
        if pred.is_floating_point():
            return (pred > threshold).long(), 2
        return pred.long(), None
    if (
        pred.dim() == target.dim() + 1
        and pred.shape[0] == target.shape[0]
        and pred.shape[2:] == target.shape[1:]
    ):
        if not pred.is_floating_point():
            raise ValueError(f"pred of shape {tuple(pred.shape)} must hold scores (floating point)")
        if pred.shape[1] == 1:
            return (pred.squeeze(1) > threshold).long(), 2
        return pred.argmax(1), int(pred.shape[1])
    raise ValueError(
        f"pred has shape {tuple(pred.shape)} and target {tuple(target.shape)}: expected pred "
        "(N, C, ...) with target (N, ...), or pred shaped like target"
    )


def multilabel_prediction(
    pred: Tensor, target: Tensor, num_labels: int, threshold: float
) -> Tensor:
    """Binary predictions ``(N, A)`` from scores (``> threshold``) or from 0/1 labels."""
    if target.dim() != 2 or target.shape[1] != num_labels:
        raise ValueError(f"target must have shape (N, {num_labels}), got {tuple(target.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred must have shape {tuple(target.shape)}, got {tuple(pred.shape)}")
    return (pred > threshold).long() if pred.is_floating_point() else pred.long()


class Accuracy(Metric):
    """Fraction of correct predictions.

    Single-label (``num_labels=None``): ``pred`` is ``(N, C)`` scores (argmax), or one score
    per sample for a binary task (``pred > threshold``; the default 0 suits logits, use 0.5 for
    probabilities), or integer labels; ``target`` is ``(N,)`` (extra trailing dimensions such as
    pixels are allowed). Multi-label (``num_labels=A``): ``pred`` and ``target`` are ``(N, A)``;
    the accuracy of each attribute over its labelled samples is computed, then averaged over the
    attributes that have any (as is usual for the 40 CelebA attributes).

    Args:
        num_labels: number of binary labels for multi-label data, None for single-label.
        threshold: decision threshold on binary scores.
        validate_args: check that labels are valid (one host sync per batch).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import Accuracy
        >>> m = Accuracy()
        >>> m.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
        >>> round(m.compute(), 4)
        0.6667
        >>> ml = Accuracy(num_labels=2)
        >>> ml.update(torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1, 1], [1, 1]]))
        >>> ml.compute()  # attribute 0: 2/2, attribute 1: 1/2
        0.75
    """

    name = "accuracy"
    higher_is_better = True

    def __init__(
        self, num_labels: int | None = None, *, threshold: float = 0.0, validate_args: bool = True
    ) -> None:
        super().__init__()
        if num_labels is not None:
            positive_int(num_labels, "num_labels")
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.validate_args = validate_args
        width = num_labels or 1
        self.add_state("correct", torch.zeros(width, dtype=torch.long))  # (A,) correct count
        self.add_state("total", torch.zeros(width, dtype=torch.long))  # (A,) labelled count

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        if self.num_labels is None:
            labels, classes = single_label_prediction(pred, target, self.threshold)
            valid = expand_mask(mask, target.shape)
            if self.validate_args:
                check_labels(target, valid, classes, "target")
            hit = labels == target.long()
            if valid is None:
                valid = torch.ones_like(hit)
            self._add("correct", (hit & valid).sum().reshape(1))
            self._add("total", valid.sum().reshape(1))
        else:
            labels = multilabel_prediction(pred, target, self.num_labels, self.threshold)
            valid = expand_mask(mask, target.shape)
            if self.validate_args:
                check_labels(target, valid, 2, "target")
            hit = labels == target.long()
            if valid is None:
                valid = torch.ones_like(hit)
            self._add("correct", (hit & valid).sum(0))
            self._add("total", valid.sum(0))

    def _compute(self) -> float | Tensor:
        correct, total = self._get("correct"), self._get("total")
        keep = total > 0
        if not bool(keep.any()):
            return NAN
        dtype = float_dtype(correct.device)
        return (correct[keep].to(dtype) / total[keep].to(dtype)).mean()

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, threshold={self.threshold}"


class F1(Metric):
    """F1 score: binary (positive class 1), macro over classes, or mean over binary labels.

    * ``num_classes == 2`` (default): F1 of class 1, ``2 TP / (2 TP + FP + FN)``; ``pred`` is
      ``(N, 2)`` scores or one score per sample (``> threshold``) or labels.
    * ``num_classes > 2``: macro F1, the unweighted mean over classes of the per-class F1,
      from a confusion matrix. A class that appears neither in the targets nor in the
      predictions (``2 TP + FP + FN = 0``) is left out of the mean, as scikit-learn does by
      default.
    * ``num_labels=A``: multi-label ``(N, A)``; the binary F1 of each attribute, averaged over
      the attributes with a positive target or prediction.

    NaN when no class or attribute qualifies (e.g. no positive targets and no positive
    predictions in binary mode).

    Args:
        num_classes: number of classes for single-label data.
        num_labels: number of binary labels for multi-label data (then ``num_classes`` must
            stay 2).
        threshold: decision threshold on binary scores (0 for logits).
        validate_args: check that labels are valid (one host sync per batch).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import F1
        >>> m = F1()  # TP = 1, FP = 1, FN = 1 -> 2 / (2 + 1 + 1)
        >>> m.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]))
        >>> m.compute()
        0.5
    """

    name = "f1"
    higher_is_better = True

    def __init__(
        self,
        num_classes: int = 2,
        *,
        num_labels: int | None = None,
        threshold: float = 0.0,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        positive_int(num_classes, "num_classes", minimum=2)
        if num_labels is not None:
            positive_int(num_labels, "num_labels")
            if num_classes != 2:
                raise ValueError("num_classes must be 2 (binary labels) when num_labels is given")
        self.num_classes = num_classes
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.validate_args = validate_args
        if num_labels is None:
            # (C, C) counts, rows = target class, columns = predicted class
            self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long))
        else:
            for key in ("tp", "fp", "fn"):  # (A,) per-attribute counts
                self.add_state(key, torch.zeros(num_labels, dtype=torch.long))

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        if self.num_labels is not None:
            labels = multilabel_prediction(pred, target, self.num_labels, self.threshold)
            valid = expand_mask(mask, target.shape)
            if self.validate_args:
                check_labels(target, valid, 2, "target")
            if valid is None:
                valid = torch.ones_like(labels, dtype=torch.bool)
            t = target.long() == 1
            p = labels == 1
            self._add("tp", (p & t & valid).sum(0))
            self._add("fp", (p & ~t & valid).sum(0))
            self._add("fn", (~p & t & valid).sum(0))
            return
        c = self.num_classes
        labels, implied = single_label_prediction(pred, target, self.threshold)
        if implied is not None and implied != c:
            raise ValueError(f"pred implies {implied} classes but num_classes={c}")
        valid = expand_mask(mask, target.shape)
        if self.validate_args:
            check_labels(target, valid, c, "target")
            check_labels(labels, valid, c, "pred")
        t, p = target.long(), labels
        if valid is not None:
            t, p = t[valid], p[valid]
        counts = torch.bincount((t * c + p).reshape(-1), minlength=c * c)
        self._add("confmat", counts.reshape(c, c))

    def _compute(self) -> float | Tensor:
        if self.num_labels is not None:
            tp, fp, fn = self._get("tp"), self._get("fp"), self._get("fn")
        else:
            cm = self._get("confmat")
            tp = cm.diagonal()
            fp = cm.sum(0) - tp
            fn = cm.sum(1) - tp
            if self.num_classes == 2:
                tp, fp, fn = tp[1:], fp[1:], fn[1:]
        dtype = float_dtype(tp.device)
        denom = (2 * tp + fp + fn).to(dtype)
        keep = denom > 0
        if not bool(keep.any()):
            return NAN
        return (2 * tp[keep].to(dtype) / denom[keep]).mean()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_labels={self.num_labels}, "
            f"threshold={self.threshold}"
        )


def binary_auc(scores: Tensor, positive: Tensor) -> float:
    """Exact ROC AUC by the Mann-Whitney statistic with average ranks for ties (NaN if one
    class is absent)."""
    n = scores.numel()
    n_pos = int(positive.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    dtype = float_dtype(scores.device)
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(dtype)
    mean_rank = ends - (counts.to(dtype) - 1) / 2  # ranks are 1-based; ties share the mean
    rank_sum = mean_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class AUC(Metric):
    """Exact area under the ROC curve, for binary or multi-label targets.

    Computed from the kept scores by the Mann-Whitney U statistic (ties count one half), which
    equals the trapezoidal area under the exact ROC curve.

    .. warning:: The state keeps every score and label (``"cat"`` states: 8 + 2 bytes per
       labelled entry), so its memory grows linearly with the evaluated data.

    Inputs: binary ``target`` ``(N,)`` in {0, 1} with ``pred`` ``(N,)`` or ``(N, 1)`` scores
    (logits or probabilities: any increasing transform gives the same AUC) or ``(N, 2)`` class
    scores (the difference ``pred[:, 1] - pred[:, 0]`` ranks the samples as the softmax does).
    Multi-label (``num_labels=A``): ``pred`` and ``target`` ``(N, A)``; the AUC of each
    attribute, averaged over the attributes that have both classes among their labelled
    entries. NaN if none has.

    Args:
        num_labels: number of binary labels for multi-label data, None for binary.
        validate_args: check labels and that scores are finite (one host sync per batch).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import AUC
        >>> m = AUC()  # positive pairs ranked right: (0.8 > 0.1), (0.8 > 0.4), (0.35 > 0.1)
        >>> m.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> m.compute()
        0.75
    """

    name = "auc"
    higher_is_better = True

    def __init__(self, num_labels: int | None = None, *, validate_args: bool = True) -> None:
        super().__init__()
        if num_labels is not None:
            positive_int(num_labels, "num_labels")
        self.num_labels = num_labels
        self.validate_args = validate_args
        width = num_labels or 1
        self.add_state("scores", torch.zeros(0, width, dtype=torch.float64), "cat")  # (n, A)
        self.add_state("targets", torch.zeros(0, width, dtype=torch.bool), "cat")  # (n, A)
        self.add_state("valid", torch.zeros(0, width, dtype=torch.bool), "cat")  # (n, A)

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        if self.num_labels is None:
            if target.dim() != 1:
                raise ValueError(
                    f"target must have shape (N,) for binary AUC, got {tuple(target.shape)}"
                )
            if pred.dim() == 2 and pred.shape[1] == 2:
                pred = pred[:, 1] - pred[:, 0]
            elif pred.dim() == 2 and pred.shape[1] == 1:
                pred = pred[:, 0]
            if pred.shape != target.shape:
                raise ValueError(
                    "pred must have shape (N,), (N, 1) or (N, 2) for target (N,), "
                    f"got {tuple(pred.shape)}"
                )
            pred, target = pred[:, None], target[:, None]
            if mask is not None:
                mask = expand_mask(mask, target.shape[:1])[:, None]  # type: ignore[index]
        elif pred.shape != target.shape or target.dim() != 2 or target.shape[1] != self.num_labels:
            raise ValueError(
                f"pred and target must both have shape (N, {self.num_labels}), got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        valid = expand_mask(mask, target.shape)
        if valid is None:
            valid = torch.ones(target.shape, dtype=torch.bool, device=target.device)
        if self.validate_args:
            check_labels(target, valid, 2, "target")
            if not bool(torch.isfinite(pred[valid]).all()):
                raise ValueError("pred holds non-finite scores")
        self._append(
            "scores",
            torch.where(valid, pred, torch.zeros((), dtype=pred.dtype, device=pred.device)),
        )
        self._append(
            "targets",
            torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
            == 1,
        )
        self._append("valid", valid)

    def _compute(self) -> float:
        scores, targets, valid = self._get("scores"), self._get("targets"), self._get("valid")
        values = [
            binary_auc(scores[:, a][valid[:, a]], targets[:, a][valid[:, a]])
            for a in range(scores.shape[1])
        ]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else NAN

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}"
