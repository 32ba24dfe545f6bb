"""Shape and mask helpers shared by the metrics and the task losses (private)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(value: object, arg: str) -> Tensor:
    """Return ``value`` if it is a tensor, else raise a ValueError naming ``arg``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")  # noqa: TRY004
    return value


def as_bool_mask(mask: Tensor | None, arg: str = "mask") -> Tensor | None:
    """Check a mask: bool, or integer (non-zero = keep). Float masks are refused.

    A float mask is ambiguous (a weight of 0.5 is not "keep" or "drop"), so it is an error
    rather than a silent threshold.
    """
    if mask is None:
        return None
    check_tensor(mask, arg)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(
            f"{arg} must be a bool (or integer 0/1) tensor marking labelled entries, "
            f"got dtype {mask.dtype}"
        )
    return mask != 0


def expand_mask(
    mask: Tensor | None, shape: torch.Size | tuple[int, ...], arg: str = "mask"
) -> Tensor | None:
    """Broadcast a per-sample (or per-unit) mask to ``shape``.

    ``mask`` must have exactly ``shape`` or a leading part of it (e.g. ``(N,)`` for targets of
    shape ``(N, H, W)``); the missing trailing dimensions are broadcast.
    """
    mask = as_bool_mask(mask, arg)
    if mask is None:
        return None
    shape = tuple(shape)
    if tuple(mask.shape) == shape:
        return mask
    if mask.dim() <= len(shape) and tuple(mask.shape) == shape[: mask.dim()]:
        view = tuple(mask.shape) + (1,) * (len(shape) - mask.dim())
        return mask.reshape(view).expand(shape)
    raise ValueError(
        f"{arg} has shape {tuple(mask.shape)}; expected {shape} or a leading part of it "
        f"(e.g. {shape[:1]} for one flag per sample)"
    )


def pixel_mask(mask: Tensor | None, valid: Tensor, arg: str = "mask") -> Tensor:
    """``valid`` (per pixel, no channel dimension) combined with ``mask``.

    ``mask`` is per sample ``(N,)``, per pixel ``(N, H, W)``, or ``(N, 1, H, W)``.
    """
    if mask is not None and mask.dim() == valid.dim() + 1 and mask.shape[1] == 1:
        mask = mask[:, 0]
    m = expand_mask(mask, valid.shape, arg)
    return valid if m is None else valid & m


def match_regression(pred: Tensor, target: Tensor) -> Tensor:
    """Return ``pred`` shaped like ``target`` (drops a trailing output dimension of size 1).

    Shapes that would silently broadcast (``(N, 1) - (N,)`` gives ``(N, N)``) are errors.
    """
    if pred.shape == target.shape:
        return pred
    if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1 and pred.shape[:-1] == target.shape:
        return pred.squeeze(-1)
    raise ValueError(
        f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}; "
        "they must match (a trailing output dimension of size 1 in pred is allowed)"
    )


def squeeze_channel(t: Tensor, ref_dim: int) -> Tensor:
    """Drop dimension 1 of ``t`` if it has size 1 and ``t`` has ``ref_dim + 1`` dimensions."""
    if t.dim() == ref_dim + 1 and t.shape[1] == 1:
        return t.squeeze(1)
    return t


def float_dtype(device: torch.device) -> torch.dtype:
    """The accumulation dtype: float64, except on devices without it (MPS: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64
