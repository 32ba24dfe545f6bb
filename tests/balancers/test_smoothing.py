"""CR-MOGM: the moving average of any Gram weighting's weights, worked against the wrapped
method run alone, and agreement with TorchJD's CRMOGMWeighting."""

from __future__ import annotations

import pytest
import torch
from _hard import F32, hard_jacobians
from _inputs import conflicting_jacobian, run

from mtlkit import balancers
from mtlkit.balancers._smoothing import CRMOGM

F64 = torch.float64
TASKS = ["a", "b", "c"]


@pytest.mark.parametrize(("method", "options"), [
    ("mgda", {}), ("upgrad", {}), ("imtl", {}), ("pcgrad", {"seed": 3}), ("config", {}),
])
def test_cr_mogm_is_the_moving_average_of_the_wrapped_weights(method, options):
    alpha = 0.7
    b = CRMOGM(TASKS, method=method, alpha=alpha, method_options=options)
    alone = balancers.create(method, TASKS, **options)
    smoothed = None
    for seed in range(4):
        jac = conflicting_jacobian(3, 7, seed=seed, strength=1.2)
        d, step = run(b, jac, dtype=F64)
        _, ref = run(alone, jac, dtype=F64)
        w = ref.weight_tensor
        smoothed = w if smoothed is None else alpha * smoothed + (1 - alpha) * w
        torch.testing.assert_close(step.weight_tensor, smoothed.to(step.weight_tensor.dtype))
        torch.testing.assert_close(d, step.weight_tensor.double() @ jac)


def test_cr_mogm_alpha_zero_is_the_wrapped_method_and_one_freezes():
    jacs = [conflicting_jacobian(3, 7, seed=s, strength=1.2) for s in range(3)]
    zero, one, alone = (CRMOGM(TASKS, alpha=0.0), CRMOGM(TASKS, alpha=1.0),
                        balancers.create("mgda", TASKS))
    first = None
    for jac in jacs:
        _, s0 = run(zero, jac, dtype=F64)
        _, s1 = run(one, jac, dtype=F64)
        _, ref = run(alone, jac, dtype=F64)
        first = ref.weight_tensor if first is None else first
        torch.testing.assert_close(s0.weight_tensor, ref.weight_tensor.to(s0.weight_tensor.dtype))
        torch.testing.assert_close(s1.weight_tensor, first.to(s1.weight_tensor.dtype))


def test_cr_mogm_hard_inputs():
    for case, jac in hard_jacobians(3, 6, 4).items():
        k = jac.shape[0]
        b = CRMOGM([f"t{i}" for i in range(k)], method="upgrad")
        for _ in range(2):
            d, step = run(b, jac, dtype=F32)
        assert torch.isfinite(d).all() and torch.isfinite(step.weight_tensor).all(), case


def test_cr_mogm_keeps_the_wrapped_state():
    b = CRMOGM(TASKS, method="upgrad")
    assert "smoothed" in b.state_dict() and "inner.step" in b.state_dict()
    run(b, conflicting_jacobian(3, 5, seed=0), dtype=F64)
    assert int(b.inner.step) == 1


def test_cr_mogm_rejects_methods_that_are_not_gram_weightings():
    with pytest.raises(ValueError, match="graddrop"):
        CRMOGM(TASKS, method="graddrop")
    with pytest.raises(ValueError, match="alpha"):
        CRMOGM(TASKS, alpha=1.5)
    with pytest.raises(ValueError, match="unknown balancer"):
        CRMOGM(TASKS, method="nope")


def test_cr_mogm_agrees_with_torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    b = CRMOGM(TASKS, method="upgrad", alpha=0.8)
    ref = agg.CRMOGMWeighting(agg.UPGradWeighting(), alpha=0.8)
    for seed in range(5):
        jac = conflicting_jacobian(3, 8, seed=seed, strength=1.3)
        _, step = run(b, jac, dtype=F64)
        torch.testing.assert_close(step.weight_tensor, ref(jac @ jac.T), rtol=1e-4, atol=1e-6)
