"""MetaBalance: per-block rescaling of the auxiliary gradients towards the target's magnitude,
worked by hand over steps; its two limits (r = 1: equal magnitudes per block, r = 0: the plain
sum). MetaBalance has no TorchJD or LibMTL implementation to compare with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.balancers._metabalance import MetaBalance

F64 = torch.float64


def two_blocks(grads: list[tuple[torch.Tensor, torch.Tensor]], dtype=F64):
    """Shared parameters a (2,) and b (3,), and losses whose gradients are the given blocks."""
    a = nn.Parameter(torch.zeros(2, dtype=dtype))
    b = nn.Parameter(torch.zeros(3, dtype=dtype))
    losses = [1.0 + ga.to(dtype) @ a + gb.to(dtype) @ b for ga, gb in grads]
    return a, b, losses


def random_blocks(k: int, seed: int, scales=None):
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * k
    return [(s * torch.randn(2, generator=g, dtype=F64), s * 3 * torch.randn(3, generator=g,
             dtype=F64)) for s in scales]


def test_relax_one_gives_every_block_the_target_magnitude():
    """r = 1 and beta = 0: in each block every auxiliary gradient is rescaled to the target's
    norm there (float32, auxiliary tasks at 1e-4 and 1e4 times the target's scale)."""
    grads = random_blocks(3, 0, scales=[1.0, 1e-4, 1e4])
    bal = MetaBalance(["t", "x", "y"], relax_factor=1.0, beta=0.0)
    a, b, losses = two_blocks(grads, torch.float32)
    bal.backward(losses, shared=[a, b])
    for i, p in enumerate((a, b)):
        target = grads[0][i]
        expected = target + sum(g[i] * target.norm() / g[i].norm() for g in grads[1:])
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_relax_zero_is_the_plain_sum():
    grads = random_blocks(3, 1, scales=[1.0, 10.0, 0.1])
    a, b, losses = two_blocks(grads)
    MetaBalance(["t", "x", "y"], relax_factor=0.0).backward(losses, shared=[a, b])
    torch.testing.assert_close(a.grad, sum(g[0] for g in grads))
    torch.testing.assert_close(b.grad, sum(g[1] for g in grads))


@pytest.mark.parametrize("target", ["t", "y"])
def test_moving_average_of_norms_by_hand(target):
    r, beta = 0.7, 0.9
    tasks = ["t", "x", "y"]
    bal = MetaBalance(tasks, target=target, relax_factor=r, beta=beta)
    m = torch.zeros(2, 3, dtype=F64)
    ti = tasks.index(target)
    for step in range(4):
        grads = random_blocks(3, 10 + step, scales=[1.0, 3.0 + step, 0.2])
        a, b, losses = two_blocks(grads)
        out = bal.backward(losses, shared=[a, b])
        for i, p in enumerate((a, b)):
            norms = torch.stack([g[i].norm() for g in grads])
            m[i] = beta * m[i] + (1 - beta) * norms
            w = r * m[i, ti] / m[i] + (1 - r)
            w[ti] = 1.0
            torch.testing.assert_close(p.grad, sum(w[k] * grads[k][i] for k in range(3)))
        assert out.weights[target] == pytest.approx(1.0)


def test_zero_auxiliary_gradient_and_single_task():
    grads = random_blocks(2, 3)
    grads[1] = (torch.zeros(2, dtype=F64), grads[1][1])  # zero in block a only
    a, b, losses = two_blocks(grads)
    out = MetaBalance(["t", "x"], relax_factor=1.0, beta=0.0).backward(losses, shared=[a, b])
    torch.testing.assert_close(a.grad, grads[0][0])
    assert all(torch.isfinite(torch.tensor(list(out.weights.values()))))
    a, b, losses = two_blocks(grads[:1])
    MetaBalance(["t"]).backward(losses, shared=[a, b])
    torch.testing.assert_close(a.grad, grads[0][0])


def test_validation():
    with pytest.raises(ValueError, match="target"):
        MetaBalance(["a", "b"], target="z")
    with pytest.raises(ValueError, match="relax_factor"):
        MetaBalance(["a", "b"], relax_factor=1.5)
    with pytest.raises(ValueError, match="beta"):
        MetaBalance(["a", "b"], beta=1.0)
