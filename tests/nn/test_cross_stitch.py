"""Cross-stitch networks: identity start, the paper's initialisation, per-channel mixing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.nn import CrossStitch, CrossStitchUnit, mixing_init


def _conv_column(task: str) -> list[nn.Module]:
    out = 3 if task == "seg" else 1
    return [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Conv2d(4, out, 1),
    ]


@pytest.mark.parametrize("channels", [None, (4, 4)], ids=["per-layer", "per-channel"])
def test_identity_init_reproduces_independent_single_task_columns(channels) -> None:
    model = CrossStitch(["seg", "depth", "edge"], _conv_column, channels=channels).eval()
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    for t in model.tasks:
        alone = nn.Sequential(*model.columns[t])(x)
        assert torch.equal(out[t], alone), t


def test_paper_initialisation() -> None:
    torch.testing.assert_close(mixing_init(2, (0.9, 0.1)), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    m = mixing_init(3, (0.8, 0.2))  # alpha_d split evenly: rows still sum to alpha_s + alpha_d
    torch.testing.assert_close(m.diagonal(), torch.full((3,), 0.8))
    torch.testing.assert_close(m.sum(1), torch.ones(3))
    unit = CrossStitchUnit(2, channels=5, init=(0.9, 0.1))
    assert unit.alpha.shape == (5, 2, 2)


def test_per_channel_unit_mixes_each_channel_with_its_own_matrix() -> None:
    unit = CrossStitchUnit(2, channels=3)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(3, 2, 2))
    x = torch.randn(2, 4, 3, 5)  # (tasks, batch, channels, length)
    y = unit(x)
    for c in range(3):
        a = unit.alpha[c]
        torch.testing.assert_close(y[0, :, c], a[0, 0] * x[0, :, c] + a[0, 1] * x[1, :, c])
        torch.testing.assert_close(y[1, :, c], a[1, 0] * x[0, :, c] + a[1, 1] * x[1, :, c])
    with pytest.raises(ValueError, match="3 channels"):
        unit(torch.randn(2, 4, 5))


def test_task_parameters_start_after_the_last_unit() -> None:
    model = CrossStitch(["a", "b"], _conv_column, stitch_after=[0])
    owned = {id(p) for p in model.task_parameters("a")}
    expected = {id(p) for s in model.columns["a"][1:] for p in s.parameters()}
    assert owned == expected
    assert {id(p) for p in model.stitch_parameters()} == {id(u.alpha) for u in model.units}
    model(torch.randn(2, 3, 8, 8))
    assert model.features.shape == (2, 2, 4, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stitch_after": []}, "stitch_after"),
        ({"stitch_after": [2]}, "stitch_after"),
        ({"stitch_after": [1, 0]}, "increasing"),
        ({"channels": (4,)}, "channels"),
        ({"init": (1.0,)}, "init"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrossStitch(["a", "b"], _conv_column, **kwargs)


def test_columns_must_match() -> None:
    def ragged(t: str) -> list[nn.Module]:
        return [nn.Linear(2, 2)] * (1 if t == "a" else 2)

    with pytest.raises(ValueError, match="same"):
        CrossStitch(["a", "b"], ragged)
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="reuses"):
        CrossStitch(["a", "b"], lambda t: [shared, nn.Linear(2, 1)])
    model = CrossStitch(["a", "b"], lambda t: [nn.Linear(2, 3 if t == "a" else 4), nn.Linear(3, 1)])
    with pytest.raises(ValueError, match="different shapes"):
        model(torch.randn(1, 2))
