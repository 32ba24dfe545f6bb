"""Per-task learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.optim import model_param_groups, per_task_param_groups


class TwoHeads(nn.Module):
    tasks = ("a", "b")

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 3)
        self.heads = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_parameters(self, task):
        return self.heads[task].parameters()


def test_each_task_steps_with_its_own_learning_rate():
    model = TwoHeads()
    groups = model_param_groups(model, lr=0.1, shared_lr=0.01, task_lr={"b": 1.0})
    opt = torch.optim.SGD(groups)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [
        ("shared", 0.01), ("a", 0.1), ("b", 1.0)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    # with unit gradients, each parameter moves by exactly its group's learning rate
    for name, p in model.named_parameters():
        lr = 0.01 if name.startswith("trunk") else (0.1 if ".a." in name else 1.0)
        torch.testing.assert_close(before[name] - p.detach(), torch.full_like(p, lr))


def test_bad_groups_are_named():
    model = TwoHeads()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]"):
        model_param_groups(model, lr=0.1, task_lr={"c": 0.1})
    with pytest.raises(ValueError, match=r"task_lr\['a'\] must be a positive"):
        model_param_groups(model, lr=0.1, task_lr={"a": -1.0})
    with pytest.raises(ValueError, match="lr must be a positive"):
        model_param_groups(model, lr=0.0)
    with pytest.raises(ValueError, match="both group 'shared' and 'a'"):
        per_task_param_groups(model.trunk.parameters(), {"a": model.trunk.parameters()}, lr=0.1)
