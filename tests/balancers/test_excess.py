"""ExcessMTL: the exponentiated-gradient weights worked by hand over steps, invariance to the
scale of each loss, the warm-up baseline, hard inputs, and agreement with TorchJD."""

from __future__ import annotations

import math

import pytest
import torch
from _hard import F32, hard_jacobians
from _inputs import random_jacobian, run

from mtlkit.balancers._excess import ExcessMTL

F64 = torch.float64


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def by_hand(jacs: list[torch.Tensor], eta: float, warmup: int = 0) -> list[torch.Tensor]:
    """Algorithm 1 in plain loops: S += g^2, E = sum g^2 / sqrt(S), r = E / baseline,
    w <- w exp(eta r) / Z."""
    k, p = jacs[0].shape
    s = torch.zeros(k, p, dtype=F64)
    w = torch.full((k,), 1.0 / k, dtype=F64)
    base = torch.zeros(k, dtype=F64)
    out = []
    for t, jac in enumerate(jacs):
        s += jac**2
        e = torch.tensor([sum(float(jac[i, j] ** 2 / math.sqrt(s[i, j])) for j in range(p)
                              if s[i, j] > 0) for i in range(k)], dtype=F64)
        if t < max(warmup, 1):
            base += e
        if t >= warmup:
            w = w * torch.exp(eta * e / (base / max(warmup, 1)))
            w = w / w.sum()
        out.append(w.clone())
    return out


@pytest.mark.parametrize(("eta", "warmup"), [(1.0, 0), (0.5, 2)])
def test_excess_mtl_weights_by_hand(eta, warmup):
    jacs = [random_jacobian(3, 5, seed=s) * torch.tensor([[1.0], [0.5 + s], [2.0]], dtype=F64)
            for s in range(5)]
    b = ExcessMTL(names(3), robust_step_size=eta, warmup_steps=warmup)
    expected = by_hand(jacs, eta, warmup)
    for jac, w in zip(jacs, expected):
        d, step = run(b, jac, dtype=F64)
        torch.testing.assert_close(step.weight_tensor, w.to(step.weight_tensor.dtype),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d, step.weight_tensor @ jac)


def test_excess_mtl_is_invariant_to_the_scale_of_each_loss():
    """Multiplying a task's loss by a constant scales its excess risk and its baseline alike:
    the weights do not change (float32 model, scales 1e-4..1e4)."""
    outs = []
    for scales in ((1.0, 1.0, 1.0), (1e-4, 1.0, 1e4)):
        b = ExcessMTL(names(3))
        for s in range(4):
            jac = random_jacobian(3, 6, seed=s) * torch.tensor(scales, dtype=F64)[:, None]
            _, step = run(b, jac, dtype=F32)
        outs.append(step.weight_tensor)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-6)


def test_excess_mtl_task_further_from_its_optimum_gains_weight():
    """A task whose gradients stay large relative to its history gains weight over one whose
    gradients shrink (converging)."""
    b = ExcessMTL(["shrinking", "steady"])
    for t in range(6):
        jac = torch.tensor([[0.5**t, 0.0], [0.0, 1.0]], dtype=F64)
        _, step = run(b, jac, dtype=F64)
    assert step.weights["steady"] > 0.9


def test_excess_mtl_hard_inputs_stay_on_the_simplex():
    for case, jac in hard_jacobians(3, 6, 3).items():
        k = jac.shape[0]
        b = ExcessMTL(names(k))
        for _ in range(3):
            d, step = run(b, jac, dtype=F32)
        w = step.weight_tensor
        assert torch.isfinite(d).all() and bool((w >= 0).all()), case
        assert float(w.sum()) == pytest.approx(1.0, rel=1e-5), case


def test_excess_mtl_agrees_with_torchjd_with_one_warmup_step():
    """TorchJD (like the official code) uses the first step's raw excess risk in its first
    update; with ``n_warmup_steps=1`` its baseline and every update are the paper's, as ours
    (see ExcessMTL's note)."""
    agg = pytest.importorskip("torchjd.aggregation")
    b = ExcessMTL(names(4))
    ref = agg.ExcessMTLWeighting(n_warmup_steps=1)
    for s in range(6):
        jac = random_jacobian(4, 7, seed=s) * torch.tensor([[1.0], [2.0], [0.5], [3.0]],
                                                           dtype=F64)
        _, step = run(b, jac, dtype=F64)
        torch.testing.assert_close(step.weight_tensor.double(), ref(jac), rtol=1e-5, atol=1e-7)


def test_validation():
    with pytest.raises(ValueError, match="robust_step_size"):
        ExcessMTL(["a", "b"], robust_step_size=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ExcessMTL(["a", "b"], warmup_steps=-1)
