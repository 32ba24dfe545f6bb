"""Fully-adaptive feature sharing: affinities, greedy top-down widening, the tree model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.nn import FullyAdaptiveSharing, branch_affinity, task_affinity, widen

TASKS = ("a", "b", "c", "d")
# a~b and c~d are close; the pairs are far apart.
AFFINITY = torch.tensor(
    [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.1, 0.2], [0.2, 0.1, 1.0, 0.9], [0.1, 0.2, 0.9, 1.0]]
)


def _thin(depth: int = 3) -> FullyAdaptiveSharing:
    layers = [nn.Sequential(nn.Linear(5 if i == 0 else 6, 6), nn.ReLU()) for i in range(depth)]
    return FullyAdaptiveSharing(layers, {t: nn.Linear(6, 1) for t in TASKS})


def test_task_affinity_by_hand() -> None:
    e = {
        "a": torch.tensor([1, 1, 0, 0, 1]),
        "b": torch.tensor([1, 0, 0, 1, 1]),
        "c": torch.zeros(5),
    }
    a = task_affinity(e)
    # a, b agree on examples 0, 2, 4 (both wrong, both right, both wrong): 3/5.
    # a, c agree where a is right (2 of 5); b, c likewise (2 of 5).
    expected = torch.tensor(
        [[1.0, 0.6, 0.4], [0.6, 1.0, 0.4], [0.4, 0.4, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(a, expected)
    with pytest.raises(ValueError, match="same"):
        task_affinity({"a": torch.ones(3), "b": torch.ones(4)})
    with pytest.raises(ValueError, match="0/1"):
        task_affinity({"a": torch.tensor([0.5])})


def test_branch_affinity_is_the_symmetrised_mean_of_minima() -> None:
    # Ã({0}, {2, 3}) = min(0.2, 0.1) = 0.1; Ã({2, 3}, {0}) = mean(0.2, 0.1) = 0.15.
    assert branch_affinity(AFFINITY, [0], [2, 3]) == pytest.approx(0.125)
    assert branch_affinity(AFFINITY, [0, 1], [0, 1]) == pytest.approx(0.9)


def test_widening_groups_related_tasks_top_down() -> None:
    model = _thin()
    assert model.groups[2] == (TASKS,) and model.active_depth == 2 and model.can_widen
    # Loss (c - 1) * 0.1 + mean over groups of (1 - within-group affinity):
    # c=1: 0.9, c=2 ({a,b}, {c,d}): 0.1 + 0.1 = 0.2, c=3: 0.2 + 0.1/3, c=4: 0.3.
    wide = widen(model, AFFINITY)
    assert wide.groups == ((TASKS,), (TASKS,), (("a", "b"), ("c", "d")))
    assert wide.active_depth == 1
    wider = widen(wide, AFFINITY, num_groups=2)
    assert wider.groups[1] == (("a", "b"), ("c", "d")) and wider.active_depth == 0
    done = widen(wider, AFFINITY, num_groups=1)
    assert not done.can_widen and done.active_depth == -1
    with pytest.raises(ValueError, match="cannot be widened"):
        widen(done, AFFINITY)
    # The input model is untouched.
    assert model.groups[2] == (TASKS,) and len(model.branches[2]) == 1


def test_branch_cost_trades_branches_against_separation() -> None:
    model = _thin()
    assert len(widen(model, AFFINITY, branch_cost=10.0).groups[2]) == 1
    assert len(widen(model, AFFINITY, branch_cost=0.0).groups[2]) == 4
    assert len(widen(model, AFFINITY, num_groups=3).groups[2]) == 3


def test_new_branches_start_as_copies_so_the_function_is_unchanged() -> None:
    model = _thin()
    x = torch.randn(7, 5)
    wide = widen(widen(model, AFFINITY), AFFINITY, num_groups=2)
    before, after = model(x), wide(x)
    for t in TASKS:
        # Equal up to float32 rounding: with several threads a wider matmul may sum in
        # another order (seen: 7e-9 on one element of 7).
        torch.testing.assert_close(after[t], before[t], rtol=1e-6, atol=1e-7)
    # features packs the two depth-2 branches, (a, b) and (c, d), of 6 units each.
    assert model.features.shape == (7, 6) and wide.features.shape == (7, 12)
    first, second = wide.branches[2][0], wide.branches[2][1]
    assert first[0].weight is not second[0].weight
    torch.testing.assert_close(first[0].weight, second[0].weight)


def test_errors_mapping_is_accepted_and_checked() -> None:
    errors = {
        "a": torch.tensor([1, 1, 0, 0]),
        "b": torch.tensor([1, 1, 0, 0]),
        "c": torch.tensor([0, 1, 1, 1]),
        "d": torch.tensor([0, 1, 1, 1]),
    }
    assert widen(_thin(), errors).groups[2] == (("a", "b"), ("c", "d"))
    with pytest.raises(ValueError, match="exactly the tasks"):
        widen(_thin(), {"a": errors["a"]})
    with pytest.raises(ValueError, match="symmetric"):
        widen(_thin(), AFFINITY.triu())
    with pytest.raises(ValueError, match="num_groups"):
        widen(_thin(), AFFINITY, num_groups=5)


def test_singleton_branches_are_task_parameters() -> None:
    wide = widen(_thin(depth=2), AFFINITY, branch_cost=0.0)  # top layer: one copy per task
    owned = {id(p) for p in wide.task_parameters("c")}
    c_branch = wide.branches[1][wide.groups[1].index(("c",))]
    assert {id(p) for p in c_branch.parameters()} <= owned
    shared = {id(p) for p in wide.shared_parameters()}
    assert {id(p) for p in wide.branches[0].parameters()} <= shared


def test_a_widened_structure_can_be_rebuilt_and_loaded() -> None:
    wide = widen(widen(_thin(), AFFINITY), AFFINITY, num_groups=2)
    fresh = _thin()
    rebuilt = FullyAdaptiveSharing(
        [fresh.branches[d][0] for d in range(3)],
        {t: nn.Linear(6, 1) for t in TASKS},
        groups=wide.groups,
        active_depth=wide.active_depth,
    )
    rebuilt.load_state_dict(wide.state_dict())
    x = torch.randn(3, 5)
    for t in TASKS:
        torch.testing.assert_close(rebuilt(x)[t], wide(x)[t])
    with pytest.raises(ValueError, match="nested"):
        FullyAdaptiveSharing(
            [nn.Linear(5, 6), nn.Linear(6, 6)],
            {t: nn.Linear(6, 1) for t in TASKS},
            groups=[[("a", "b"), ("c", "d")], [("a", "c"), ("b", "d")]],
        )


def test_features_pack_the_deepest_shared_branch_of_every_task() -> None:
    model = widen(_thin(), AFFINITY, num_groups=3)  # top: (a, b), (c), (d) below one trunk
    assert model.groups[2] == (("a", "b"), ("c",), ("d",))
    x = torch.randn(7, 5)
    out = model(x)
    h1 = model.branches[1][0](model.branches[0][0](x))  # the all-task layers
    ab = model.branches[2][0](h1)
    torch.testing.assert_close(model.features, torch.cat([h1, ab], dim=1))
    torch.testing.assert_close(out["a"], model.heads["a"](ab))
    torch.testing.assert_close(out["d"], model.heads["d"](model.branches[2][2](h1)))
    alone = widen(_thin(depth=1), AFFINITY, branch_cost=0.0)  # nothing shared at all
    alone(x)
    assert alone.features is None
    with pytest.raises(ValueError, match="no layer is shared"):
        alone.require_features()
