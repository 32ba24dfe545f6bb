"""Mixtures of experts: MMoE, CGC, PLE, DSelect-k."""

from __future__ import annotations

import pytest
import torch

from mtlkit.nn import CGC, PLE, DSelectK, DSelectKGate, MMoE, smooth_step


def test_mmoe_output_is_the_tower_of_the_gate_weighted_expert_sum() -> None:
    model = MMoE(3, {"a": 2, "b": 1}, num_experts=3, expert_hidden=(4,), tower_hidden=())
    x = torch.randn(5, 3)
    out = model(x)
    experts = [e(x) for e in model.experts]
    for t in model.tasks:
        w = torch.softmax(model.gates[t].linear(x), dim=1)
        mixed = sum(w[:, i : i + 1] * experts[i] for i in range(3))
        torch.testing.assert_close(out[t], model.towers[t](mixed))
    torch.testing.assert_close(model.features, torch.stack(experts, 1))


def test_smooth_step_values() -> None:
    g = 2.0
    t = torch.tensor([-5.0, -1.0, 0.0, 0.5, 1.0, 5.0])
    # Inside: -2 t^3 / g^3 + 3 t / (2 g) + 1/2; at t = g/4: -1/32 + 3/8 + 1/2 = 0.84375.
    torch.testing.assert_close(smooth_step(t, g), torch.tensor([0.0, 0.0, 0.5, 0.84375, 1.0, 1.0]))
    t = torch.tensor([-1.0, 1.0], requires_grad=True)  # zero slope at both ends (C1)
    (grad,) = torch.autograd.grad(smooth_step(t, g).sum(), t)
    torch.testing.assert_close(grad, torch.zeros(2))


def test_dselect_k_weights_sum_to_one_for_a_power_of_two() -> None:
    gate = DSelectKGate(3, num_experts=8, k=3)
    w = gate(torch.randn(6, 3))
    assert w.shape == (6, 8) and bool((w > 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    assert gate.regularization().item() == 0.0  # no entropy weight, nothing unreachable


def test_dselect_k_saturated_selector_picks_the_binary_code() -> None:
    # 6 experts need 3 bits; codes are most-significant bit first: 5 is 101, 3 is 011.
    gate = DSelectKGate(4, num_experts=6, k=2, gamma=1.0)
    torch.nn.init.zeros_(gate.z.weight)
    gate.z.bias.data = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])  # selector 0 -> 5, 1 -> 3
    torch.nn.init.zeros_(gate.w.weight)
    torch.nn.init.zeros_(gate.w.bias)  # equal selector weights
    w = gate(torch.randn(2, 4))
    expected = torch.zeros(2, 6)
    expected[:, 5] = 0.5
    expected[:, 3] = 0.5
    torch.testing.assert_close(w, expected)
    # One-hot selectors on reachable experts: entropy 0 and the reachability term 1 + 1.
    gate.entropy_weight = 1.0
    torch.testing.assert_close(gate.regularization(), torch.tensor(2.0), atol=1e-4, rtol=0)


def test_dselect_k_unreachable_codes_lose_weight_and_are_penalised() -> None:
    gate = DSelectKGate(4, num_experts=5, k=2)
    w = gate(torch.randn(3, 4))
    assert bool((w.sum(1) < 1).all())
    # Each selector's reachable mass is about 5/8 at initialisation: penalty ~ 2 * 8/5.
    assert 3.0 < gate.regularization().item() < 3.5


def test_dselect_k_static_gate_ignores_the_input() -> None:
    model = DSelectK(3, {"a": 1, "b": 1}, num_experts=4, k=2, per_example=False, expert_hidden=(4,))
    gate = model.gates["a"]
    torch.testing.assert_close(gate(torch.randn(2, 3))[0], gate(torch.randn(2, 3))[1])
    assert model.regularizer().item() == 0.0


def test_ple_partition_follows_the_shared_gates() -> None:
    model = PLE(4, {"a": 1, "b": 1}, num_levels=3, expert_hidden=(4,), tower_hidden=())
    owned_a = {id(p) for p in model.task_parameters("a")}
    ids = lambda m: {id(p) for p in m.parameters()}
    last, middle, first = model.levels[2], model.levels[1], model.levels[0]
    assert ids(last.task_experts["a"]) <= owned_a and ids(last.task_gates["a"]) <= owned_a
    assert ids(middle.task_gates["a"]) <= owned_a  # feeds only a's last-level experts
    assert not ids(middle.task_experts["a"]) & owned_a  # feeds the shared gate
    assert not ids(first.task_gates["a"]) & owned_a  # feeds experts that feed the shared gate
    assert last.shared_gate is None and middle.shared_gate is not None
    x = torch.randn(2, 4)
    out = model(x)
    # features pack (4 units each): a's and b's inputs of the middle level, its experts (2 per
    # task, 2 shared) and the last level's 2 shared experts: (2 + 4 + 2 + 2) * 4 = 40.
    assert model.features.shape == (2, 40)
    torch.testing.assert_close(out["a"], _ple_reference(model, x)["a"])


def _ple_reference(model: PLE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """PLE written out level by level, as in Tang et al. (2020), Section 4.3."""
    inputs, shared = {t: x for t in model.tasks}, x
    for level in model.levels:
        experts_shared = [e(shared) for e in level.shared_experts]
        own = {t: [e(inputs[t]) for e in level.task_experts[t]] for t in model.tasks}
        new = {}
        for t in model.tasks:
            w = torch.softmax(level.task_gates[t].linear(inputs[t]), dim=1)
            new[t] = sum(w[:, i : i + 1] * h for i, h in enumerate(own[t] + experts_shared))
        if level.shared_gate is not None:
            every = [h for t in model.tasks for h in own[t]] + experts_shared
            w = torch.softmax(level.shared_gate.linear(shared), dim=1)
            shared = sum(w[:, i : i + 1] * h for i, h in enumerate(every))
        inputs = new
    return {t: model.towers[t](inputs[t]) for t in model.tasks}


@pytest.mark.parametrize("levels", [2, 3])
def test_ple_matches_the_level_by_level_formula(levels: int) -> None:
    model = PLE(4, {"a": 1, "b": 2, "c": 1}, num_levels=levels, expert_hidden=(5,))
    x = torch.randn(3, 4)
    out = model(x)
    for t, y in _ple_reference(model, x).items():
        torch.testing.assert_close(out[t], y)


def test_cgc_features_are_the_shared_experts() -> None:
    model = CGC(4, {"a": 1, "b": 3}, num_shared_experts=3, expert_hidden=(5,))
    x = torch.randn(2, 4)
    model(x)
    expected = torch.stack([e(x) for e in model.levels[0].shared_experts], 1)
    torch.testing.assert_close(model.features, expected)
    owned = {id(p) for p in model.task_parameters("b")}
    assert {id(p) for p in model.levels[0].task_experts["b"].parameters()} <= owned


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MMoE(4, {"a": 1}, num_experts=0), "num_experts"),
        (lambda: MMoE(4, {}, num_experts=2), "tasks"),
        (lambda: MMoE(4, {"a": 1}, expert_hidden=()), "expert_hidden"),
        (lambda: PLE(4, {"a": 1}, num_levels=0), "num_levels"),
        (lambda: DSelectK(4, {"a": 1}, num_experts=1), "num_experts"),
        (lambda: DSelectKGate(4, 4, k=0), "k"),
        (lambda: DSelectKGate(4, 4, gamma=0.0), "gamma"),
        (lambda: MMoE(4, {"a.b": 1}), "a.b"),
    ],
)
def test_bad_arguments_name_the_argument(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
