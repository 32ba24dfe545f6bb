"""Minimal stand-ins for tasks, metrics and models, so trainer tests do not depend on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


class MeanAbsError:
    higher_is_better = False

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        self.total += float((pred.squeeze(-1) - target).abs().sum())
        self.count += target.numel()

    def compute(self) -> float:
        return self.total / self.count


@dataclass(frozen=True)
class RegressionTask:
    name: str
    kind: str = "regression"
    primary: str = "mae"
    num_outputs: int = 1

    def loss(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return (pred.squeeze(-1) - target).pow(2).mean()

    def metrics(self) -> dict[str, MeanAbsError]:
        return {"mae": MeanAbsError()}


class TwoTaskData(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = {"a": self.x[:, 0] * 2, "b": 50 * self.x[:, 1:3].sum(1)}

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {k: v[i] for k, v in self.y.items()}


class TinyModel(nn.Module):
    tasks = ("a", "b")

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in self.tasks})
        self.features: Tensor | None = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.features = self.trunk(x)
        return {t: h(self.features) for t, h in self.heads.items()}

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_parameters(self, task: str):
        return self.heads[task].parameters()
