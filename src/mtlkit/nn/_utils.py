"""Small helpers shared by the architecture files."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mtlkit.nn._base import int_sequence, positive_int

#: A column description: either a function task -> list of stage modules, or one factory per
#: stage (each called once per task, so every task gets its own weights).
ColumnSpec = Callable[[str], Sequence[nn.Module]] | Sequence[Callable[[], nn.Module]]


def mlp(in_features: int, hidden: Sequence[int], out_features: int | None = None) -> nn.Sequential:
    """``Linear -> ReLU`` for each hidden size, then a plain ``Linear`` to ``out_features``.

    With ``out_features=None`` the block ends with the last hidden ReLU (an expert or trunk).
    """
    positive_int("in_features", in_features)
    sizes = int_sequence("hidden", hidden)
    layers: list[nn.Module] = []
    d = in_features
    for h in sizes:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    if out_features is not None:
        layers.append(nn.Linear(d, positive_int("out_features", out_features)))
    return nn.Sequential(*layers)


def module_list(container: nn.ModuleDict | nn.ModuleList, key: str | int) -> nn.ModuleList:
    """``container[key]`` typed as the ``nn.ModuleList`` it is (for the type checker)."""
    m = container[key]  # type: ignore[index]
    assert isinstance(m, nn.ModuleList)
    return m


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``Conv2d (same padding, with bias) -> BatchNorm2d -> ReLU``, SegNet's basic layer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def build_columns(tasks: Sequence[str], column: ColumnSpec) -> dict[str, nn.ModuleList]:
    """Instantiate one column (a list of stages) per task and check they have equal depth."""
    if callable(column):
        stages = {t: list(column(t)) for t in tasks}
    elif isinstance(column, Sequence) and column and all(callable(f) for f in column):
        stages = {t: [f() for f in column] for t in tasks}
    else:
        raise ValueError(
            "column must be a function task -> list of stage modules, or a non-empty "
            f"sequence of stage factories; got {column!r}"
        )
    depths = {t: len(s) for t, s in stages.items()}
    if len(set(depths.values())) != 1 or 0 in depths.values():
        raise ValueError(
            f"column: every task needs the same, non-zero number of stages, got {depths}"
        )
    seen: set[int] = set()
    for t, ss in stages.items():
        for i, s in enumerate(ss):
            if not isinstance(s, nn.Module):
                raise TypeError(f"column: stage {i} of task {t!r} is not an nn.Module: {s!r}")
            for p in s.parameters():
                if id(p) in seen:
                    raise ValueError(
                        f"column: stage {i} of task {t!r} reuses a parameter of another stage "
                        "or task; the column must build fresh modules for every task"
                    )
                seen.add(id(p))
    return {t: nn.ModuleList(ss) for t, ss in stages.items()}


def pack_features(tensors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One tensor holding ``tensors``, and views of it shaped like each of them.

    For models whose shared computation reaches the task-specific part through several
    tensors (a cut of several tensors): the model runs everything shared, packs the cut, and
    lets the task-specific part read only the views. The packed tensor is then a single
    ``features`` tensor through which all shared gradient flows. It is ``(batch, N)`` when
    every tensor has the same size in dim 0 (the batch), else 1-D. This costs one copy of the
    cut's activations.
    """
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    batch_first = len(sizes) == 1 and None not in sizes
    flat = [t.flatten(1) if batch_first else t.reshape(-1) for t in tensors]
    packed = torch.cat(flat, dim=-1)
    pieces = packed.split([f.shape[-1] for f in flat], dim=-1)
    return packed, [p.reshape(t.shape) for p, t in zip(pieces, tensors)]
