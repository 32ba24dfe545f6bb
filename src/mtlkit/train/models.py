"""Default models for the built-in comparisons: a hard-sharing network sized to the data.

Images (C, H, W) get a small convolutional encoder; vectors get the MLP trunk of the GradNorm
synthetic benchmark (Chen et al. 2018: four fully-connected layers of 100 units). Each task gets a
small MLP head with as many outputs as it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtlkit.nn import HardSharing
from mtlkit.tasks import Task


def task_outputs(task: Task) -> int:
    """Number of outputs a head needs for ``task``."""
    return int(task.num_outputs)


def default_model(input_shape: Sequence[int], tasks: Sequence[Task]) -> HardSharing:
    """A hard-sharing model for inputs of ``input_shape`` (without the batch dimension)."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        encoder: nn.Module = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(),
        )
        width = 128
    elif len(input_shape) == 1:
        width = 100
        encoder = nn.Sequential(
            nn.Linear(input_shape[0], width), nn.ReLU(),
            *[m for _ in range(3) for m in (nn.Linear(width, width), nn.ReLU())],
        )
    else:
        raise ValueError(f"no default model for inputs of shape {tuple(input_shape)}")
    heads = {
        t.name: nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, task_outputs(t)))
        for t in tasks
    }
    return HardSharing(encoder, heads)
