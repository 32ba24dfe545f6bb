"""Blocks of the decoder-focused models (PAD-Net, MTI-Net) and their deep supervision.

A deeply supervised model sets ``aux_outputs`` after each forward: ``{task: [initial
prediction, ...]}``, each already resized to the task's final output size, and
``aux_weight``. :func:`deep_supervision_loss` turns them into one scalar with the tasks' own
losses; the trainer adds it to the balanced objective, so balancers see only the K final task
losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import positive_int
from mtlkit.nn._resnet import BasicBlock

if TYPE_CHECKING:
    from mtlkit.tasks import Task


def refine_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two residual basic blocks ``in -> out -> out`` (a 1x1 projection on the skip when the
    widths differ): the per-task feature block before an initial prediction."""
    down = None
    if in_channels != out_channels:
        down = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, downsample=down),
        BasicBlock(out_channels, out_channels),
    )


def conv_head(in_channels: int, out_channels: int, hidden: int | None = None) -> nn.Sequential:
    """``1x1 conv-BN-ReLU -> 1x1 conv``: the HRNet segmentation head (Sun et al. 2019), used
    for the final predictions on HRNet features."""
    h = in_channels if hidden is None else positive_int("hidden", hidden)
    return nn.Sequential(
        nn.Conv2d(in_channels, h, 1, bias=False),
        nn.BatchNorm2d(h),
        nn.ReLU(inplace=True),
        nn.Conv2d(h, out_channels, 1),
    )


class MultiModalDistillation(nn.Module):
    """PAD-Net's attention-guided multi-modal distillation for one target task.

    Xu, Ouyang, Wang, Sebe, *PAD-Net* (CVPR 2018, arXiv:1805.04409), Sec. 3.2 (the
    attention-guided variant): ``D_t = F_t + sum_{u != t} G_t * (W_{t,u} F_u)`` with the gate
    ``G_t = sigmoid(W_g F_t)`` computed from the target task's own features. ``W`` are 3x3
    convolutions (no bias) followed by batch norm.

    Args:
        target: the target task.
        sources: the other tasks, whose features send messages.
        channels: feature channels (the same for every task).

    Example:
        >>> import torch
        >>> from mtlkit.nn._distill import MultiModalDistillation
        >>> d = MultiModalDistillation("a", ["b"], 4)
        >>> tuple(d({"a": torch.randn(1, 4, 8, 8), "b": torch.randn(1, 4, 8, 8)}).shape)
        (1, 4, 8, 8)
    """

    def __init__(self, target: str, sources: Sequence[str], channels: int) -> None:
        super().__init__()
        positive_int("channels", channels)
        self.target = target
        self.sources = tuple(sources)
        self.gate = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.Sigmoid(),
        )
        self.messages = nn.ModuleDict(
            {
                u: nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                )
                for u in self.sources
            }
        )

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        own = features[self.target]
        if not self.sources:
            return own
        gate = self.gate(own)
        total = sum(self.messages[u](features[u]) for u in self.sources)
        out: Tensor = own + gate * total
        return out


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resizing to ``size`` (no copy when it already has that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def deep_supervision_loss(
    model: nn.Module,
    tasks: Sequence[Task],
    targets: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
) -> Tensor | None:
    """``aux_weight * sum_t sum_i loss_t(aux_outputs[t][i], y_t)``, or ``None`` when the model
    has no initial predictions (any model but PAD-Net and MTI-Net).

    Every initial prediction is supervised with its task's own loss and label, as in PAD-Net
    and MTI-Net, all with the same weight ``model.aux_weight`` (1 by default). The sum is not
    seen by the balancer: add it to the balanced objective (the trainer back-propagates it
    before ``balancer.backward``).

    Raises:
        ValueError: a task has no label in ``targets``.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task
        >>> from mtlkit.nn._distill import deep_supervision_loss
        >>> class M(torch.nn.Module):
        ...     aux_weight = 0.5
        ...     aux_outputs = {"y": [torch.tensor([[1.0]]), torch.tensor([[3.0]])]}
        >>> deep_supervision_loss(M(), [Task.regression("y")], {"y": torch.tensor([0.0])})
        tensor(5.)
    """
    aux: Mapping[str, Sequence[Tensor]] | None = getattr(model, "aux_outputs", None)
    if not aux:
        return None
    weight = float(getattr(model, "aux_weight", 1.0))
    total: Any = 0.0
    masks = masks or {}
    for task in tasks:
        if task.name not in aux:
            continue
        if task.name not in targets:
            raise ValueError(f"deep supervision: no label for task {task.name!r}")
        for pred in aux[task.name]:
            total = total + task.loss(pred, targets[task.name], masks.get(task.name))
    if not isinstance(total, Tensor):
        return None
    return weight * total


def check_aux_weight(value: float) -> float:
    """``aux_weight`` must be a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e300:
        raise ValueError(f"aux_weight must be a finite number >= 0, got {value!r}")
    return float(value)


def stack_features(features: Mapping[str, Tensor]) -> Tensor:
    """Channel concatenation of the task features, in mapping order."""
    return torch.cat(list(features.values()), dim=1)
