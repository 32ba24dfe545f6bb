"""The MultiTaskModel base class and HardSharing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlkit.nn import HardSharing, MultiTaskModel


def test_hard_sharing_forward_features_and_partition() -> None:
    enc = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    model = HardSharing(enc, {"x": nn.Linear(5, 2), "y": nn.Linear(5, 1)})
    assert isinstance(model, MultiTaskModel) and model.features is None
    x = torch.randn(4, 3)
    out = model(x)
    torch.testing.assert_close(model.features, enc(x))
    torch.testing.assert_close(out["y"], model.heads["y"](enc(x)))
    assert [id(p) for p in model.shared_parameters()] == [id(p) for p in enc.parameters()]
    assert [id(p) for p in model.task_parameters("x")] == [
        id(p) for p in model.heads["x"].parameters()
    ]


@pytest.mark.parametrize(
    ("heads", "error", "match"),
    [
        ({}, ValueError, "at least one"),
        ({"a.b": nn.Linear(2, 1)}, ValueError, "a.b"),
        ({"": nn.Linear(2, 1)}, ValueError, "non-empty"),
        ({"a": "not a module"}, TypeError, r"heads\['a'\]"),
    ],
)
def test_bad_heads_are_rejected(heads, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        HardSharing(nn.Linear(2, 2), heads)


def test_parameters_cannot_belong_to_two_owners() -> None:
    head = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="tasks 'a' and 'b' share a parameter"):
        HardSharing(nn.Linear(2, 2), {"a": head, "b": head})
    enc = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="encoder"):
        HardSharing(enc, {"a": nn.Sequential(enc, nn.Linear(2, 1))})


def test_task_parameters_checks_the_task_eagerly() -> None:
    model = HardSharing(nn.Linear(2, 2), {"a": nn.Linear(2, 1)})
    with pytest.raises(ValueError, match=r"unknown task 'b'.*\['a'\]"):
        model.task_parameters("b")  # raises before iteration


def test_a_deep_copy_drops_the_last_features() -> None:
    model = HardSharing(nn.Linear(2, 2), {"a": nn.Linear(2, 1)})
    model(torch.randn(3, 2))
    clone = copy.deepcopy(model)
    assert clone.features is None and model.features is not None
