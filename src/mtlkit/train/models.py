"""Default models for ``mtlkit compare`` and ``mtlkit train``: hard sharing, sized to the data.

* Dense tasks (segmentation, depth, normals; e.g. NYUv2): a dilated ResNet-18 encoder (output
  stride 8) and one DeepLab-v3 head per task, upsampled to the image size: the layout of the
  NYUv2 benchmarks of MTAN (Liu et al., CVPR 2019) and LibMTL, with ResNet-18 instead of
  ResNet-50 to stay usable on a CPU.
* Other tasks on images (C, H, W): a small convolutional encoder and an MLP head per task.
* Vectors: the MLP trunk of the GradNorm synthetic benchmark (Chen et al. 2018: four
  fully-connected layers of 100 units) and an MLP head per task.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn import functional as F

from mtlkit.nn import DeepLabHead, HardSharing, resnet18
from mtlkit.tasks import Task

DENSE_KINDS = ("segmentation", "depth", "normals")

#: ``builder(tasks, input_shape, **options) -> nn.Module`` returning ``{task: output}``.
ModelBuilder = Callable[..., nn.Module]
M = TypeVar("M", bound=ModelBuilder)
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[M], M]:
    """Register ``builder(tasks, input_shape, **options)`` as the model ``name``."""

    def wrap(builder: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return wrap


def available_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def model_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``, or ``package.module:function`` imported from a user's
    module (called the same way: ``function(tasks, input_shape, **options)``)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model {name!r}: cannot import {attr!r} from {module!r} ({exc})") from None
        if not callable(builder):
            raise ValueError(f"model {name!r} is not callable")
        return builder
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _MODELS[name]


def build_model(
    name: str, tasks: Sequence[Task], input_shape: Sequence[int], **options: Any
) -> nn.Module:
    """Build the model ``name`` (registered, or ``package.module:function``) for the tasks.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task
        >>> m = build_model("default", [Task.regression("y")], (4,))
        >>> tuple(m(torch.zeros(2, 4))["y"].shape)
        (2, 1)
    """
    return model_builder(name)(tasks, tuple(input_shape), **options)


def task_outputs(task: Task) -> int:
    """Number of outputs a head needs for ``task``."""
    return int(task.num_outputs)


class Resize(nn.Module):
    """Bilinear resizing of a dense prediction to a fixed ``size`` (the image's)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


@register_model("default")
def _default(tasks: Sequence[Task], input_shape: Sequence[int]) -> nn.Module:
    return default_model(input_shape, tasks)


def default_model(input_shape: Sequence[int], tasks: Sequence[Task]) -> HardSharing:
    """A hard-sharing model for inputs of ``input_shape`` (without the batch dimension).

    Example:
        >>> from mtlkit.tasks import Task
        >>> m = default_model((1, 12, 12), [Task.classification("a", 10), Task.regression("b")])
        >>> import torch
        >>> {t: tuple(y.shape) for t, y in m(torch.zeros(2, 1, 12, 12)).items()}
        {'a': (2, 10), 'b': (2, 1)}
    """
    dense = [t.name for t in tasks if t.kind in DENSE_KINDS]
    if dense:
        if len(dense) != len(tasks) or len(input_shape) != 3:
            raise ValueError(
                f"the default dense model needs image inputs (C, H, W) and dense tasks only; "
                f"got input shape {tuple(input_shape)} and tasks "
                f"{[(t.name, t.kind) for t in tasks]}"
            )
        c, h, w = input_shape
        heads = {
            t.name: nn.Sequential(
                DeepLabHead(512, task_outputs(t), rates=(6, 12, 18), channels=128, dropout=0.1),
                Resize((h, w)),
            )
            for t in tasks
        }
        return HardSharing(resnet18(in_channels=c, dilated=True), heads)
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


# The dense-prediction survey's models (hard_sharing, pad_net, mti_net, mtan, cross_stitch, nddr)
# register themselves on import.
from mtlkit.train import _dense_models  # noqa: F401
