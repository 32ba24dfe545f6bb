"""Tasks: a name, a loss that honours missing labels, fresh metrics, and the metric to select on.

A :class:`Task` is what the trainer, the balancers' helpers and the comparison tool know about
one output of a multi-task model::

    task = Task.segmentation("seg", num_classes=13)     # cross-entropy, ignore_index=-1
    loss = task.loss(pred, target, mask)                  # scalar; mask: (N,) or per pixel
    metrics = task.metrics()                              # {"miou": MeanIoU, "pixel_acc": ...}
    task.primary                                          # "miou", used for model selection

Every loss takes ``mask`` (bool, per sample or per element/pixel, True = labelled). Masked
entries contribute nothing, and the loss is the mean over the labelled ones. If a whole batch
is masked for a task, the loss is an exact zero that is still connected to the prediction
(its gradient is zero), never NaN, so a balancer and ``backward`` work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.metrics import (
    AUC,
    F1,
    MAE,
    RMSE,
    AbsErr,
    Accuracy,
    MeanIoU,
    Metric,
    NormalAngleMean,
    NormalAngleMedian,
    NormalWithin,
    PixelAccuracy,
    RelErr,
)
from mtlkit.metrics._depth import depth_inputs
from mtlkit.metrics._utils import check_tensor, expand_mask, match_regression, pixel_mask

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "DepthL1Loss",
    "LossFn",
    "MetricSet",
    "NormalCosineLoss",
    "NormalL1Loss",
    "RegressionLoss",
    "Task",
    "TaskKind",
    "masked_mean",
    "prior_loss",
]

TaskKind = Literal[
    "classification", "regression", "multilabel", "segmentation", "depth", "normals", "binary_map"
]
KINDS: tuple[str, ...] = get_args(TaskKind)


class LossFn(Protocol):
    """``loss(pred, target, mask=None) -> scalar tensor``."""

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor: ...


def masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``values`` over the ``valid`` entries; zero (attached to the graph) if none.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import masked_mean
        >>> v = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
        >>> masked_mean(v, torch.tensor([True, False, True]))
        tensor(3.5000, grad_fn=<DivBackward0>)
        >>> masked_mean(v, torch.tensor([False, False, False]))
        tensor(0., grad_fn=<DivBackward0>)
    """
    if valid is None:
        return values.mean()
    kept = torch.where(valid, values, values.new_zeros(()))
    return kept.sum() / valid.sum().clamp_min(1).to(values.dtype)


def _class_labels(pred: Tensor, target: Tensor) -> Tensor:
    if not (
        pred.dim() == target.dim() + 1
        and pred.shape[0] == target.shape[0]
        and pred.shape[2:] == target.shape[1:]
    ):
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} and target {tuple(target.shape)}: expected "
            "scores (N, C, ...) with class labels (N, ...)"
        )
    return target.round().long() if target.is_floating_point() else target.long()


@dataclass(frozen=True)
class CrossEntropyLoss:
    """Cross-entropy from scores ``(N, C, ...)`` and labels ``(N, ...)``, mean over labelled
    entries (``target != ignore_index`` and ``mask``).

    Example:
        >>> import torch
        >>> from mtlkit.tasks import CrossEntropyLoss
        >>> loss = CrossEntropyLoss()
        >>> pred = torch.zeros(3, 4, requires_grad=True)  # uniform over 4 classes: log 4 each
        >>> round(loss(pred, torch.tensor([0, 1, 2]), torch.tensor([True, False, True])).item(), 4)
        1.3863
    """

    ignore_index: int | None = None

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        labels = _class_labels(check_tensor(pred, "pred"), check_tensor(target, "target"))
        valid = expand_mask(mask, labels.shape)
        if self.ignore_index is not None:
            keep = labels != self.ignore_index
            valid = keep if valid is None else valid & keep
        if valid is not None:
            labels = torch.where(valid, labels, torch.zeros_like(labels))
        return masked_mean(F.cross_entropy(pred, labels, reduction="none"), valid)


@dataclass(frozen=True)
class RegressionLoss:
    """Mean squared (``kind="mse"``) or absolute (``kind="l1"``) error over labelled values.

    ``pred`` must match ``target`` (a trailing output dimension of size 1 is dropped); shapes
    that would broadcast are an error.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import RegressionLoss
        >>> pred = torch.tensor([[1.0], [3.0]], requires_grad=True)
        >>> RegressionLoss("mse")(pred, torch.tensor([0.0, 0.0])).item()  # (1 + 9) / 2
        5.0
    """

    kind: Literal["mse", "l1"] = "mse"

    def __post_init__(self) -> None:
        if self.kind not in ("mse", "l1"):
            raise ValueError(f"kind must be 'mse' or 'l1', got {self.kind!r}")

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        pred = match_regression(check_tensor(pred, "pred"), check_tensor(target, "target"))
        valid = expand_mask(mask, target.shape)
        t = target.to(pred.dtype)
        if valid is not None:  # unlabelled targets may be NaN: keep them out of the graph
            t = torch.where(valid, t, pred.detach())
        diff = pred - t
        values = diff.square() if self.kind == "mse" else diff.abs()
        return masked_mean(values, valid)


@dataclass(frozen=True)
class BCEWithLogitsLoss:
    """Binary cross-entropy on logits ``(N, A)`` against 0/1 targets ``(N, A)``, mean over the
    labelled (sample, label) entries; ``mask`` is ``(N,)`` or ``(N, A)``.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import BCEWithLogitsLoss
        >>> pred = torch.zeros(2, 3, requires_grad=True)
        >>> round(BCEWithLogitsLoss()(pred, torch.ones(2, 3)).item(), 4)  # log 2
        0.6931
    """

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        check_tensor(pred, "pred")
        check_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred has shape {tuple(pred.shape)} but target {tuple(target.shape)}; "
                "they must match"
            )
        valid = expand_mask(mask, target.shape)
        t = target.to(pred.dtype)
        if valid is not None:
            t = torch.where(valid, t, torch.zeros_like(t))
        return masked_mean(F.binary_cross_entropy_with_logits(pred, t, reduction="none"), valid)


@dataclass(frozen=True)
class DepthL1Loss:
    """L1 depth loss over valid pixels (``target > 0`` and ``mask``), as in MTAN.

    ``pred`` and ``target`` are ``(N, 1, H, W)`` or ``(N, H, W)``.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import DepthL1Loss
        >>> pred = torch.tensor([[[[1.0, 3.0, 9.0]]]], requires_grad=True)
        >>> DepthL1Loss()(pred, torch.tensor([[[[2.0, 2.0, 0.0]]]])).item()  # 0-depth skipped
        1.0
    """

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        p, t, valid = depth_inputs(check_tensor(pred, "pred"), check_tensor(target, "target"), mask)
        t = torch.where(valid, t.to(p.dtype), p.detach())
        return masked_mean((p - t).abs(), valid)


def _normal_inputs(pred: Tensor, target: Tensor, mask: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(unit pred, target, valid pixels)``; a pixel is valid where ``mask`` allows it and its
    target is not the zero vector (missing normals are stored as zeros)."""
    check_tensor(pred, "pred")
    check_tensor(target, "target")
    if pred.shape != target.shape or target.dim() < 2:
        raise ValueError(
            f"pred and target must have the same shape (N, 3, ...), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    t = target.to(pred.dtype)
    valid = pixel_mask(mask, t.square().sum(1) > 0)
    t = torch.where(valid.unsqueeze(1), t, torch.zeros_like(t))
    return F.normalize(pred, dim=1), t, valid


@dataclass(frozen=True)
class NormalCosineLoss:
    """``1 - cos(pred, target)`` per pixel, mean over valid pixels (non-zero target, ``mask``).

    Both vectors are normalised, so the head need not output unit vectors. ``pred`` and
    ``target`` are ``(N, 3, H, W)`` (or ``(N, 3)``); ``mask`` is ``(N,)`` or ``(N, H, W)``.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import NormalCosineLoss
        >>> pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> NormalCosineLoss()(pred, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])).item()
        0.5
    """

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        p, t, valid = _normal_inputs(pred, target, mask)
        cos = (p * F.normalize(t, dim=1)).sum(1)
        return masked_mean(1.0 - cos, valid)


@dataclass(frozen=True)
class NormalL1Loss:
    """L1 between the L2-normalised prediction and the target normal, averaged over the three
    components and the valid pixels (non-zero target, ``mask``).

    The surface-normals loss of the dense-prediction survey (Vandenhende et al., TPAMI 2021,
    arXiv:2004.13379; its public code normalises the prediction, not the target, and averages
    the absolute differences over the labelled components). Shapes as
    :class:`NormalCosineLoss`.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import NormalL1Loss
        >>> pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        >>> round(NormalL1Loss()(pred, target).item(), 4)  # (0 + (1 + 1 + 0) / 3) / 2
        0.3333
    """

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        p, t, valid = _normal_inputs(pred, target, mask)
        return masked_mean((p - t).abs().mean(1), valid)


#: ``Task.normals(loss=...)`` choices
NORMAL_LOSSES: dict[str, Callable[[], LossFn]] = {"cosine": NormalCosineLoss,
                                                   "l1": NormalL1Loss}


@dataclass(frozen=True)
class MetricSet:
    """A metrics factory: each call returns fresh metric instances, keyed by metric name.

    Args:
        specs: ``(name, metric class, ((keyword, value), ...))`` triples.

    Example:
        >>> from mtlkit.metrics import MAE, RMSE
        >>> from mtlkit.tasks import MetricSet
        >>> factory = MetricSet((("mae", MAE, ()), ("rmse", RMSE, ())))
        >>> sorted(factory())
        ['mae', 'rmse']
        >>> factory()["mae"] is factory()["mae"]
        False
    """

    specs: tuple[tuple[str, type[Metric], tuple[tuple[str, Any], ...]], ...]

    def __call__(self) -> dict[str, Metric]:
        return {name: cls(**dict(kwargs)) for name, cls, kwargs in self.specs}

    @classmethod
    def of(cls, *entries: tuple[str, type[Metric], Mapping[str, Any]]) -> MetricSet:
        """Build from ``(name, class, kwargs)`` triples with kwargs as a mapping."""
        return cls(tuple((n, c, tuple(sorted(kw.items()))) for n, c, kw in entries))


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Args:
        name: the task's key in model outputs, targets, losses and metric keys
            (``"<name>/<metric>"``); non-empty, without ``/``.
        loss: ``loss(pred, target, mask=None) -> scalar`` (see the module docstring).
        metrics: a factory returning fresh :class:`~mtlkit.metrics.Metric` instances keyed by
            metric name (called once per evaluation).
        primary: the metric used for model selection (a key of ``metrics()``).
        kind: one of ``classification``, ``regression``, ``multilabel``, ``segmentation``,
            ``depth``, ``normals``, ``binary_map`` (a binary label per pixel: edges, saliency).
        num_outputs: outputs (channels) the task's head must produce.

    Use the constructors :meth:`classification`, :meth:`regression`, :meth:`multilabel`,
    :meth:`segmentation`, :meth:`depth` and :meth:`normals` for the usual losses and metrics.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task
        >>> task = Task.classification("digit", num_classes=10)
        >>> task.primary, task.num_outputs, sorted(task.metrics())
        ('accuracy', 10, ['accuracy', 'f1'])
        >>> pred = torch.zeros(4, 10, requires_grad=True)
        >>> unlabelled = torch.zeros(4, dtype=torch.bool)
        >>> loss = task.loss(pred, torch.tensor([1, 2, 3, 4]), mask=unlabelled)
        >>> loss.item(), loss.requires_grad  # a fully unlabelled batch: zero, still differentiable
        (0.0, True)
    """

    name: str
    loss: LossFn
    metrics: Callable[[], dict[str, Metric]]
    primary: str
    kind: TaskKind
    num_outputs: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(
                f"task {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}"
            )
        if not callable(self.loss):
            raise ValueError(  # noqa: TRY004 (the library reports bad arguments as ValueError)
                f"task {self.name!r}: loss must be callable, got {type(self.loss).__name__}"
            )
        if not callable(self.metrics):
            raise ValueError(  # noqa: TRY004
                f"task {self.name!r}: metrics must be a callable returning a dict"
            )
        if (
            isinstance(self.num_outputs, bool)
            or not isinstance(self.num_outputs, int)
            or self.num_outputs < 1
        ):
            raise ValueError(
                f"task {self.name!r}: num_outputs must be an integer >= 1, got {self.num_outputs!r}"
            )
        first, second = self.metrics(), self.metrics()
        if not isinstance(first, dict) or not first:
            raise ValueError(
                f"task {self.name!r}: metrics() must return a non-empty dict name -> metric"
            )
        for key, metric in first.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(
                    f"task {self.name!r}: metric name {key!r} must be a non-empty string "
                    "without '/'"
                )
            for attr in ("update", "compute", "higher_is_better"):
                if not hasattr(metric, attr):
                    raise ValueError(f"task {self.name!r}: metric {key!r} has no {attr!r}")
            if second.get(key) is metric:
                raise ValueError(
                    f"task {self.name!r}: metrics() returned the same {key!r} instance twice; "
                    "it must build fresh metrics on every call"
                )
        if self.primary not in first:
            raise ValueError(
                f"task {self.name!r}: primary metric {self.primary!r} is not one of {sorted(first)}"
            )

    def kpi(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> float | None:
        """A key performance indicator of this batch in [1e-3, 1] (for Dynamic Task
        Prioritization): the accuracy over the labelled samples for classification, the mean
        per-label accuracy for multilabel tasks; None for the other kinds, which have no
        batch-level score in (0, 1] (DTP then derives one from the loss). Clamped at 1e-3
        because DTP takes its log.

        Example:
            >>> import torch
            >>> task = Task.classification("digit", num_classes=3)
            >>> task.kpi(torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]), torch.tensor([0, 2]))
            0.5
            >>> Task.regression("age").kpi(torch.zeros(2, 1), torch.ones(2, 1)) is None
            True
        """
        with torch.no_grad():
            if self.kind == "classification":
                hit = (pred.argmax(-1) == target).float()
            elif self.kind == "multilabel":
                hit = ((pred > 0).long() == target.long()).float().flatten(1).mean(1)
            else:
                return None
            if mask is not None:
                hit = hit[mask.reshape(-1).bool()] if hit.numel() == mask.numel() else hit
            value = float(hit.mean()) if hit.numel() else 1.0
        return min(1.0, max(value, 1e-3))

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Metric key ``"<task>/<metric>"`` -> whether higher is better (for Δm)."""
        return {f"{self.name}/{k}": bool(m.higher_is_better) for k, m in self.metrics().items()}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def classification(cls, name: str, num_classes: int, *, primary: str = "accuracy") -> Task:
        """Single-label classification: cross-entropy on ``(N, C)`` logits, integer targets
        ``(N,)``. Metrics: ``accuracy``, ``f1`` (binary F1 of class 1 when ``num_classes == 2``,
        else macro F1), and ``auc`` for two classes."""
        _check_count(num_classes, "num_classes", 2)
        specs: list[tuple[str, type[Metric], Mapping[str, Any]]] = [
            ("accuracy", Accuracy, {}),
            ("f1", F1, {"num_classes": num_classes}),
        ]
        if num_classes == 2:
            specs.append(("auc", AUC, {}))
        return cls(
            name, CrossEntropyLoss(), MetricSet.of(*specs), primary, "classification", num_classes
        )

    @classmethod
    def regression(
        cls, name: str, *, dim: int = 1, loss: Literal["mse", "l1"] = "mse", primary: str = "mae"
    ) -> Task:
        """Regression of ``dim`` values per sample (targets ``(N,)`` when ``dim == 1``, else
        ``(N, dim)``), with MSE or L1 loss. Metrics: ``mae``, ``rmse``."""
        _check_count(dim, "dim", 1)
        metrics = MetricSet.of(("mae", MAE, {}), ("rmse", RMSE, {}))
        return cls(name, RegressionLoss(loss), metrics, primary, "regression", dim)

    @classmethod
    def multilabel(cls, name: str, num_labels: int, *, primary: str = "accuracy") -> Task:
        """``num_labels`` binary labels per sample (e.g. the 40 CelebA attributes): BCE with
        logits on ``(N, A)``, 0/1 targets ``(N, A)``, mask ``(N,)`` or ``(N, A)``. Metrics:
        ``accuracy`` and ``f1``, each averaged over the attributes."""
        _check_count(num_labels, "num_labels", 1)
        metrics = MetricSet.of(
            ("accuracy", Accuracy, {"num_labels": num_labels}),
            ("f1", F1, {"num_labels": num_labels}),
        )
        return cls(name, BCEWithLogitsLoss(), metrics, primary, "multilabel", num_labels)

    @classmethod
    def segmentation(
        cls, name: str, num_classes: int, *, ignore_index: int | None = -1, primary: str = "miou"
    ) -> Task:
        """Semantic segmentation: per-pixel cross-entropy on ``(N, C, H, W)`` logits, labels
        ``(N, H, W)`` with ``ignore_index`` for unlabelled pixels. Metrics: ``miou``,
        ``pixel_acc``."""
        _check_count(num_classes, "num_classes", 2)
        kw = {"num_classes": num_classes, "ignore_index": ignore_index}
        metrics = MetricSet.of(("miou", MeanIoU, kw), ("pixel_acc", PixelAccuracy, kw))
        return cls(
            name, CrossEntropyLoss(ignore_index), metrics, primary, "segmentation", num_classes
        )

    @classmethod
    def depth(cls, name: str, *, primary: str = "abs_err") -> Task:
        """Depth estimation: L1 on valid pixels (``target > 0``), ``(N, 1, H, W)``. Metrics:
        ``abs_err``, ``rel_err``."""
        metrics = MetricSet.of(("abs_err", AbsErr, {}), ("rel_err", RelErr, {}))
        return cls(name, DepthL1Loss(), metrics, primary, "depth", 1)

    @classmethod
    def normals(
        cls, name: str, *, primary: str = "mean_angle", median_bins: int | None = None,
        loss: str = "cosine",
    ) -> Task:
        """Surface normals on valid pixels (non-zero target), ``(N, 3, H, W)``; ``loss`` is
        ``cosine`` (``1 - cos``, :class:`NormalCosineLoss`) or ``l1`` (L1 on the normalised
        prediction, :class:`NormalL1Loss`, the dense-prediction survey's). Metrics:
        ``mean_angle``, ``median_angle`` (exact unless ``median_bins``), ``within_11.25``,
        ``within_22.5``, ``within_30`` (fractions).

        Example:
            >>> from mtlkit.tasks import Task
            >>> type(Task.normals("normals", loss="l1").loss).__name__
            'NormalL1Loss'
        """
        if loss not in NORMAL_LOSSES:
            raise ValueError(f"normals loss must be one of {sorted(NORMAL_LOSSES)}, got {loss!r}")
        metrics = MetricSet.of(
            ("mean_angle", NormalAngleMean, {}),
            ("median_angle", NormalAngleMedian, {"bins": median_bins}),
            ("within_11.25", NormalWithin, {"threshold": 11.25}),
            ("within_22.5", NormalWithin, {"threshold": 22.5}),
            ("within_30", NormalWithin, {"threshold": 30.0}),
        )
        return cls(name, NORMAL_LOSSES[loss](), metrics, primary, "normals", 3)


def _check_count(value: object, arg: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")


def _binary_entropy(p: Tensor) -> Tensor:
    q = 1.0 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q))


def prior_loss(task: Task, targets: Tensor, mask: Tensor | None = None) -> float:
    """The loss of the best prediction that ignores the input, computed from the labels.

    It is what the task's default loss reaches by predicting the label distribution alone, a
    natural scale for the loss (used by the ``prior_loss`` balancer):

    * classification, segmentation: entropy (nats) of the class frequencies, i.e. the
      cross-entropy of predicting those frequencies;
    * regression: variance of the targets (MSE of predicting their mean; per output
      dimension, pooled over the labelled values) or, for an L1 task, the mean absolute
      deviation from the median;
    * multilabel: binary entropy of each label's positive rate, averaged over the labelled
      (sample, label) entries (the plain mean over labels when every entry is labelled);
    * depth: mean absolute deviation of the valid depths from their median (L1);
    * normals: ``1 - |mean of the unit target normals|`` (1 - cos to the best direction).

    Args:
        task: the task (its ``kind``, and its loss for regression and segmentation).
        targets: labels as the dataset yields them, stacked over samples.
        mask: labelled entries, as for the loss.

    Raises:
        ValueError: no labelled entry.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task, prior_loss
        >>> round(prior_loss(Task.classification("c", 4), torch.tensor([0, 0, 1, 1])), 4)  # log 2
        0.6931
        >>> prior_loss(Task.regression("r"), torch.tensor([1.0, 3.0]))  # variance
        1.0
    """
    check_tensor(targets, "targets")
    kind = task.kind
    if kind in ("classification", "segmentation"):
        labels = targets.round().long() if targets.is_floating_point() else targets.long()
        valid = torch.ones_like(labels, dtype=torch.bool)
        ignore = getattr(task.loss, "ignore_index", None)
        if ignore is not None:
            valid &= labels != ignore
        m = expand_mask(mask, labels.shape)
        if m is not None:
            valid &= m
        kept = labels[valid]
        _need(kept, task)
        if int(kept.min()) < 0:
            raise ValueError(f"task {task.name!r}: targets hold negative labels (mask them)")
        p = torch.bincount(kept).double() / kept.numel()
        return float(-torch.xlogy(p, p).sum())
    if kind == "regression":
        y = targets.double()
        if y.dim() == 1:
            y = y[:, None]
        y = y.reshape(y.shape[0], -1)
        valid = expand_mask(mask, targets.shape)
        valid = (
            torch.ones_like(y, dtype=torch.bool) if valid is None else valid.reshape(y.shape[0], -1)
        )
        _need(y[valid], task)
        l1 = getattr(task.loss, "kind", "mse") == "l1"
        total, count = 0.0, 0
        for d in range(y.shape[1]):
            col = y[:, d][valid[:, d]]
            if col.numel() == 0:
                continue
            if l1:
                total += float((col - col.median()).abs().sum())
            else:
                total += float((col - col.mean()).square().sum())
            count += col.numel()
        return total / count
    if kind == "multilabel":
        y = targets.double()
        if y.dim() != 2:
            raise ValueError(
                f"task {task.name!r}: multilabel targets must be (N, A), got {tuple(y.shape)}"
            )
        valid = expand_mask(mask, y.shape)
        valid = torch.ones_like(y, dtype=torch.bool) if valid is None else valid
        _need(y[valid], task)
        n = valid.sum(0).double()
        pos = torch.where(valid, y, torch.zeros_like(y)).sum(0)
        rate = pos / n.clamp_min(1)
        return float((n * _binary_entropy(rate)).sum() / n.sum())
    if kind == "binary_map":  # a binary label per pixel: entropy of the positive rate
        valid = expand_mask(mask, targets.shape)
        y = targets.double()[valid] if valid is not None else targets.double().flatten()
        _need(y, task)
        return float(_binary_entropy(y.mean()))
    if kind == "depth":
        _, t, valid = depth_inputs(targets, targets, mask)
        d = t[valid].double()
        _need(d, task)
        return float((d - d.median()).abs().mean())
    # normals
    if targets.dim() < 2:
        raise ValueError(
            f"task {task.name!r}: normal targets must be (N, 3, ...), got {tuple(targets.shape)}"
        )
    t = targets.double()
    valid = pixel_mask(mask, t.square().sum(1) > 0)
    units = F.normalize(t, dim=1).movedim(1, -1)[valid]
    _need(units, task)
    return float(1.0 - units.mean(0).norm())


def _need(values: Tensor, task: Task) -> None:
    if values.numel() == 0:
        raise ValueError(f"task {task.name!r}: no labelled target to compute a prior loss from")
