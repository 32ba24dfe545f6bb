"""Parameter and FLOP counts of a model for one input size (``mtlkit models``).

FLOPs here are multiply-accumulates (MACs) of the convolutions and linear layers met in one
forward pass (one MAC = one multiply and one add; some papers count 2 x MACs as FLOPs, and which
convention the dense-prediction survey of Vandenhende et al. 2021, arXiv:2004.13379, uses is not
confirmed here); batch norm, activations, additions and resizing are not counted. A layer run
twice counts twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once).

    Example:
        >>> import torch
        >>> from mtlkit.nn._complexity import count_parameters
        >>> count_parameters(torch.nn.Conv2d(3, 8, 3))  # 8 x 3 x 3 x 3 + 8
        224
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one input of ``input_shape`` (no batch dim).

    A convolution costs ``output elements x in_channels / groups x kernel area``; a linear
    layer ``output elements x in_features``. The model runs in eval mode under ``no_grad``
    (its mode is restored).

    Example:
        >>> import torch
        >>> from mtlkit.nn._complexity import count_macs
        >>> count_macs(torch.nn.Conv2d(3, 8, 3, padding=1), (3, 4, 4))  # 8*4*4 x 3*3*3
        3456
    """
    total = 0

    def conv_hook(m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.modules.conv._ConvNd)
        k = 1
        for s in m.kernel_size:
            k *= int(s)
        total += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


@dataclass(frozen=True)
class Complexity:
    """One row of ``mtlkit models``."""

    model: str
    parameters: int
    macs: int


def parse_size(text: str) -> tuple[int, ...]:
    """``"3x512x512"`` -> ``(3, 512, 512)``.

    Example:
        >>> from mtlkit.nn._complexity import parse_size
        >>> parse_size("3x64x48")
        (3, 64, 48)
    """
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"input size must look like 3x512x512, got {text!r}") from None
    if not size or any(v < 1 for v in size):
        raise ValueError(f"input size must be positive integers like 3x512x512, got {text!r}")
    return size


def format_complexity(rows: Sequence[Complexity], input_shape: Sequence[int]) -> str:
    """A Markdown table: parameters (M) and GFLOPs (multiply-accumulates)."""
    shape = "x".join(str(v) for v in input_shape)
    lines = [f"| model | parameters (M) | GFLOPs (MACs) at {shape} |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.parameters / 1e6:.2f} | {r.macs / 1e9:.2f} |")
    return "\n".join(lines)
