"""Per-task learning rates: optimiser parameter groups for shared and task-specific parameters.

Tasks learn at different speeds; giving each task's parameters (its head) its own learning rate,
and the shared trunk another, is a cheap and often decisive knob in production multi-task models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from torch import nn


class HasTaskParameters(Protocol):
    tasks: tuple[str, ...]

    def shared_parameters(self) -> Iterable[nn.Parameter]: ...

    def task_parameters(self, task: str) -> Iterable[nn.Parameter]: ...


def per_task_param_groups(
    shared: Iterable[nn.Parameter],
    task_params: Mapping[str, Iterable[nn.Parameter]],
    *,
    lr: float,
    shared_lr: float | None = None,
    task_lr: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups: one for the shared parameters, one per task.

    Args:
        shared: the shared parameters.
        task_params: task -> that task's own parameters.
        lr: default learning rate.
        shared_lr: learning rate of the shared parameters (default ``lr``).
        task_lr: task -> learning rate (tasks not listed use ``lr``).

    Returns:
        A list of dicts for any ``torch.optim`` optimiser; each has a ``"name"`` key
        (``"shared"`` or the task name) so schedulers and logs can find it.

    Example:
        >>> import torch
        >>> trunk, a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        >>> groups = per_task_param_groups(
        ...     trunk.parameters(), {"a": a.parameters(), "b": b.parameters()},
        ...     lr=1e-3, task_lr={"b": 1e-2})
        >>> [(g["name"], g["lr"]) for g in torch.optim.SGD(groups).param_groups]
        [('shared', 0.001), ('a', 0.001), ('b', 0.01)]
    """
    task_lr = dict(task_lr or {})
    unknown = [t for t in task_lr if t not in task_params]
    if unknown:
        raise ValueError(f"task_lr names unknown task(s) {unknown}; tasks are {list(task_params)}")
    _check_lr("lr", lr)
    if shared_lr is not None:
        _check_lr("shared_lr", shared_lr)
    for t, v in task_lr.items():
        _check_lr(f"task_lr[{t!r}]", v)
    groups = [{"name": "shared", "params": list(shared), "lr": lr if shared_lr is None else shared_lr}]
    groups += [
        {"name": t, "params": list(ps), "lr": task_lr.get(t, lr)} for t, ps in task_params.items()
    ]
    seen: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"a parameter is in both group {seen[id(p)]!r} and {g['name']!r}")
            seen[id(p)] = g["name"]
    return [g for g in groups if g["params"]]


def model_param_groups(
    model: HasTaskParameters,
    *,
    lr: float,
    shared_lr: float | None = None,
    task_lr: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """:func:`per_task_param_groups` for a model with ``shared_parameters()`` and
    ``task_parameters(task)`` (every :class:`mtlkit.nn.MultiTaskModel`)."""
    return per_task_param_groups(
        model.shared_parameters(),
        {t: model.task_parameters(t) for t in model.tasks},
        lr=lr,
        shared_lr=shared_lr,
        task_lr=task_lr,
    )


def _check_lr(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
