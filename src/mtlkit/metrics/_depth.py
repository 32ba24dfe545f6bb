"""Depth estimation metrics: absolute and relative error over valid pixels."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.metrics._base import Metric
from mtlkit.metrics._utils import expand_mask, float_dtype

NAN = float("nan")


def depth_inputs(
    pred: Tensor, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``pred``, ``target`` without a size-1 channel dimension, and the valid-pixel mask.

    A pixel is valid where ``target > 0`` (missing depth is stored as 0 in the NYUv2 files)
    and ``mask`` is True.
    """
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.shape != target.shape:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target {tuple(target.shape)} (after dropping "
            "a channel dimension of size 1); expected (N, H, W) or (N, 1, H, W) for both"
        )
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    valid = target > 0
    m = expand_mask(mask, target.shape)
    if m is not None:
        valid = valid & m
    return pred, target, valid


class _DepthError(Metric):
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64))  # summed pixel error
        self.add_state("count", torch.zeros((), dtype=torch.long))  # number of valid pixels

    def _error(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        pred, target, valid = depth_inputs(pred, target, mask)
        dtype = float_dtype(pred.device)
        p = pred.to(dtype)
        t = torch.where(valid, target.to(dtype), torch.ones((), dtype=dtype, device=p.device))
        err = torch.where(valid, self._error(p, t), torch.zeros((), dtype=dtype, device=p.device))
        self._add("total", err.sum())
        self._add("count", valid.sum())

    def _compute(self) -> Tensor | float:
        count = self._get("count")
        if int(count) == 0:
            return NAN
        return self._get("total") / count


class AbsErr(_DepthError):
    """Mean absolute depth error ``|d̂ - d|`` over valid pixels (``target > 0`` and ``mask``).

    As reported for NYUv2 in the MTAN literature (Liu et al., CVPR 2019, arXiv:1803.10704), but
    pooled over every valid pixel of the split rather than averaged over per-batch means.
    ``pred`` and ``target`` are ``(N, 1, H, W)`` or ``(N, H, W)``; ``mask`` is per sample or per
    pixel.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import AbsErr
        >>> m = AbsErr()
        >>> m.update(torch.tensor([[[1.0, 3.0, 5.0]]]), torch.tensor([[[2.0, 2.0, 0.0]]]))
        >>> m.compute()  # the third pixel has no depth (0) and is skipped
        1.0
    """

    name = "abs_err"

    def _error(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs()


class RelErr(_DepthError):
    """Mean relative depth error ``|d̂ - d| / d`` over valid pixels (same inputs as
    :class:`AbsErr`).

    Example:
        >>> import torch
        >>> from mtlkit.metrics import RelErr
        >>> m = RelErr()
        >>> m.update(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0, 4.0]]]))
        >>> m.compute()  # (1/2 + 1/4) / 2
        0.375
    """

    name = "rel_err"

    def _error(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs() / target
