"""What a dataset loader returns: three splits, the tasks, and the input shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.tasks import Task

Sample = tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class DatasetBundle:
    """A multi-task dataset ready to train on.

    Attributes:
        name: the registry name.
        train, val, test: datasets yielding ``(x, {task: y})``, or ``(x, {task: y},
            {task: mask})`` when some labels are missing. Select models on ``val``; ``test`` is
            for the final numbers only.
        tasks: the tasks, in output order.
        input_shape: shape of one input ``x`` (without the batch dimension).
        info: dataset-specific facts (sizes, seeds, generating parameters, provenance).
        model: the registered model (``mtlkit.train.models``) its protocol trains by default.
        model_options: options for that model.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    tasks: tuple[Task, ...]
    input_shape: tuple[int, ...]
    info: Mapping[str, Any] = field(default_factory=dict)
    model: str = "default"
    model_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        """The task names, in order."""
        return [t.name for t in self.tasks]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s))}" for s in ("train", "val", "test"))  # type: ignore[arg-type]
        return (
            f"DatasetBundle({self.name!r}, {sizes}, tasks={self.task_names}, "
            f"input_shape={self.input_shape})"
        )


class MultiTaskTensorDataset(Dataset):
    """In-memory multi-task dataset: one input tensor and one target tensor per task.

    Args:
        inputs: ``(N, ...)`` inputs.
        targets: task -> ``(N, ...)`` targets.
        masks: optional task -> ``(N,)`` or ``(N, ...)`` bool mask (True = labelled); when
            given, items are ``(x, {task: y}, {task: mask})``.

    Example:
        >>> import torch
        >>> from mtlkit.data import MultiTaskTensorDataset
        >>> ds = MultiTaskTensorDataset(torch.zeros(3, 2), {"a": torch.tensor([0, 1, 2])})
        >>> x, y = ds[1]
        >>> len(ds), tuple(x.shape), int(y["a"])
        (3, (2,), 1)
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(inputs, Tensor) or inputs.dim() == 0:
            raise ValueError("inputs must be a tensor with a sample dimension")
        if not targets:
            raise ValueError("targets must name at least one task")
        n = inputs.shape[0]
        for t, y in targets.items():
            if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n:
                raise ValueError(f"targets[{t!r}] must be a tensor with {n} samples")
        if masks is not None:
            for t, m in masks.items():
                if t not in targets:
                    raise ValueError(f"masks[{t!r}] names no task of targets {list(targets)}")
                if (
                    not isinstance(m, Tensor)
                    or m.dtype != torch.bool
                    or m.dim() == 0
                    or m.shape[0] != n
                ):
                    raise ValueError(f"masks[{t!r}] must be a bool tensor with {n} samples")
        self.inputs = inputs
        self.targets = dict(targets)
        self.masks = None if masks is None else dict(masks)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, i: int) -> Sample:
        x = self.inputs[i]
        y = {t: v[i] for t, v in self.targets.items()}
        if self.masks is None:
            return x, y
        return x, y, {t: m[i] for t, m in self.masks.items()}
