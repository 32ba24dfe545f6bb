"""The loss weightings' contract: weights computed on the host, learned weights with closed-form
gradients (see ``mtlkit.balancers._base.LossWeighting``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mtlkit import balancers
from mtlkit.balancers import LossWeighting, UncertaintyWeighting
from mtlkit.balancers._imtl_l import IMTLL

TASKS = ("a", "b", "c")
# Loss values over eight orders of magnitude, in float32 (the hard case for the closed forms).
VALUES = torch.tensor([3e-4, 1.7, 5e4])


def _losses(values: torch.Tensor) -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    p = torch.nn.Parameter(torch.ones(len(values), dtype=values.dtype))
    return p, {t: v * p[i] for i, (t, v) in enumerate(zip(TASKS, values))}


def _objective_uw(s: torch.Tensor, values: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # Kendall et al. 2018, eqs. (7) and (10): sum_k c_k e^{-s_k} L_k + s_k / 2
    return (c * torch.exp(-s) * values).sum() + 0.5 * s.sum()


def _objective_imtl_l(s: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # Liu et al. 2021, Section 3.2: sum_k e^{s_k} L_k - s_k
    return (torch.exp(s) * values).sum() - s.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_learned_weights_gradients_are_those_of_the_papers_objectives(dtype):
    """UW's and IMTL-L's closed-form gradients equal autograd through their objectives (and the
    reported loss is the objective's value), at loss scales 3e-4 .. 5e4 and after the learned
    parameters moved away from 0; a second step accumulates into ``.grad``."""
    values = VALUES.to(dtype)
    s0 = torch.tensor([-2.0, 0.3, 4.0], dtype=dtype)
    c = torch.tensor([0.5, 1.0, 0.5], dtype=dtype)
    uw = UncertaintyWeighting(TASKS, kinds={"a": "regression", "b": "classification",
                                            "c": "regression"}).to(dtype)
    imtl = IMTLL(TASKS).to(dtype)
    cases = [(uw, uw.log_vars, lambda s: _objective_uw(s, values, c)),
             (imtl, imtl.log_scales, lambda s: _objective_imtl_l(s, values))]
    for balancer, param, objective in cases:
        with torch.no_grad():
            param.copy_(s0)
        s = s0.clone().requires_grad_()
        total = objective(s)
        (expected,) = torch.autograd.grad(total, s)
        p, losses = _losses(values)
        step = balancer.backward(losses)
        torch.testing.assert_close(param.grad, expected)
        torch.testing.assert_close(step.loss, total.detach())
        # the model received sum_k w_k grad L_k with w = d objective / d L
        w = torch.autograd.functional.jacobian(lambda v: _at(balancer, v, s0), values)  # noqa: B023
        torch.testing.assert_close(p.grad, w * values)
        torch.testing.assert_close(step.weight_tensor, w)
        balancer.backward(_losses(values)[1])
        torch.testing.assert_close(param.grad, 2 * expected)


def _at(balancer: LossWeighting, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """d objective / d L at the loss values v (the weights), through the paper's formula."""
    if isinstance(balancer, UncertaintyWeighting):
        return _objective_uw(s, v, torch.exp(balancer.log_scale.to(s)))
    return _objective_imtl_l(s, v)


def test_host_state_stays_on_the_host_in_its_own_dtype():
    """Moving or casting a host-weights balancer leaves its state where its maths runs; a
    learned balancer's parameters follow the module."""
    dwa = balancers.create("dwa", TASKS)
    before = {k: (v.device, v.dtype) for k, v in dwa.state_dict().items()}
    dwa.to(torch.float16).to("meta")
    assert {k: (v.device, v.dtype) for k, v in dwa.state_dict().items()} == before
    uw = balancers.create("uw", TASKS).to(torch.float64)
    assert uw.log_vars.dtype == torch.float64


class _View(LossWeighting):
    """Returns a writable view of its state, then changes that state."""

    def __init__(self, tasks, **options):
        super().__init__(tasks, **options)
        self.register_buffer("w", torch.ones(len(tasks), dtype=torch.float64))

    def loss_weights(self, values, context):
        out = self.w.numpy()
        out += 1  # 2, 3, 4, ... at successive steps
        return out


class _Constant(LossWeighting):
    reads_values = False

    def __init__(self, tasks, **options):
        super().__init__(tasks, **options)
        self.seen: list[object] = []

    def loss_weights(self, values, context):
        self.seen.append(values)
        return self._constant(lambda: [1.0, 2.0, 3.0])


def test_returned_arrays_are_copied_and_constant_ones_converted_once():
    view = _View(TASKS)
    first = view.backward(_losses(VALUES)[1])
    second = view.backward(_losses(VALUES)[1])
    assert first.weight_tensor.tolist() == [2.0] * 3  # not changed by the second step
    assert second.weight_tensor.tolist() == [3.0] * 3
    const = _Constant(TASKS)
    steps = [const.backward(_losses(VALUES)[1]) for _ in range(3)]
    assert const.seen == [None] * 3  # reads_values = False: no values read
    assert steps[0].weight_tensor is steps[2].weight_tensor  # one tensor, made once
    assert steps[0].weight_tensor.tolist() == [1.0, 2.0, 3.0]
    const.load_state_dict(const.state_dict())  # a state load remakes it
    assert const.backward(_losses(VALUES)[1]).weight_tensor is not steps[0].weight_tensor


class _WrongShape(LossWeighting):
    def loss_weights(self, values, context):
        return [1.0, 1.0]


def test_weights_of_the_wrong_shape_are_an_error_naming_the_method():
    with pytest.raises(ValueError, match=r"_WrongShape.loss_weights returned shape \(2,\); "
                                         r"expected \(3,\)"):
        _WrongShape(TASKS).backward(_losses(VALUES)[1])


@pytest.mark.parametrize("name", ["rlw", "cosmos"])
def test_block_draws_resume_exactly_across_block_boundaries(name):
    """Random draws made 64 steps at a time: a run resumed mid-block from its state (into a
    fresh balancer) draws exactly the rows of an uninterrupted run, on both sides of a block
    boundary; no row repeats."""
    def weights(b, steps):
        return [b.backward(_losses(VALUES)[1]).weight_tensor.tolist() for _ in range(steps)]

    whole = weights(balancers.create(name, TASKS, seed=5), 140)
    first = balancers.create(name, TASKS, seed=5)
    head = weights(first, 70)
    resumed = balancers.create(name, TASKS, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + weights(resumed, 70) == whole
    assert len({tuple(w) for w in whole}) == len(whole)


def test_a_copied_balancer_keeps_its_own_host_state():
    """Views of host buffers are not carried into a copy (they would write into the
    original's buffers)."""


    original = balancers.create("famo", TASKS, update="next_batch")
    original.backward(_losses(VALUES)[1])
    twin = copy.deepcopy(original)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    for _ in range(3):
        twin.backward(_losses(VALUES * 0.5)[1])
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(twin.logits, original.logits)


def test_inner_adam_on_host_floats_equals_inner_adam_on_tensors():
    from mtlkit.balancers._functional import InnerAdam

    host, device = (InnerAdam(3, lr=0.05, dtype=torch.float64) for _ in range(2))
    x, y = np.array([0.1, -0.2, 0.3]), torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = torch.randn(3, generator=gen, dtype=torch.float64) * 1e3
        host.step(memoryview(x), g.tolist())
        device.step(y, g)
    np.testing.assert_allclose(x, y.numpy(), rtol=1e-13, atol=0)
    np.testing.assert_allclose(host.v.numpy(), device.v.numpy(), rtol=1e-13)
    assert int(host.t) == int(device.t) == 20


def test_fixed_and_prior_weightings_print_their_numbers():
    fixed = balancers.create("fixed", ("a", "b"), weights={"a": 0.5, "b": 2.0})
    prior = balancers.create("prior_loss", ("a", "b"), priors={"a": 2.0, "b": 0.5})
    assert repr(fixed) == "FixedWeighting(weights={'a': 0.5, 'b': 2.0})"
    assert repr(prior) == "PriorLossWeighting(priors={'a': 2.0, 'b': 0.5})"
