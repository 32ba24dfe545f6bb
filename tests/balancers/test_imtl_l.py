"""IMTL-L: the learned scales' gradient, convergence to equal scaled losses at any loss scale,
one backward pass, and agreement with TorchJD's IMTLL scalarizer."""

from __future__ import annotations

import pytest
import torch
from _inputs import CountBackward, Net, batches

from mtlkit.balancers._imtl_l import IMTLL


def test_scales_make_the_scaled_losses_equal_whatever_their_scale():
    """The objective sum e^s L - s is convex in s with its only stationary point at
    e^{s_k} L_k = 1: for losses from 1e-4 to 1e4 (float32) the scales' gradient is 0 there and
    points back to it from either side."""
    values = torch.tensor([1e-4, 1.0, 3e2, 1e4])
    p = torch.nn.Parameter(torch.ones(()))
    for shift, sign in ((0.0, 0), (0.5, 1), (-0.5, -1)):
        b = IMTLL(["a", "b", "c", "d"])
        with torch.no_grad():
            b.log_scales.copy_(-torch.log(values) + shift)
        b.backward([p * v for v in values])
        grad = b.log_scales.grad
        if sign == 0:
            torch.testing.assert_close(grad, torch.zeros(4), rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.exp(b.log_scales.detach()) * values, torch.ones(4))
        else:
            assert bool((torch.sign(grad) == sign).all())


def test_gradients_of_the_objective():
    b = IMTLL(["a", "b"])
    with torch.no_grad():
        b.log_scales.copy_(torch.tensor([0.5, -1.0]))
    p = torch.nn.Parameter(torch.tensor(2.0))
    step = b.backward([p * 3.0, p**2])
    w = torch.exp(torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(step.weight_tensor, w)
    torch.testing.assert_close(p.grad, w[0] * 3.0 + w[1] * 4.0)
    torch.testing.assert_close(b.log_scales.grad, w * torch.tensor([6.0, 4.0]) - 1)


def test_one_backward_pass_like_a_plain_sum():
    net = Net(["a", "b", "c"])
    (x, y), = batches(1, 3)
    losses, _ = net.losses(x, y)
    CountBackward.calls = 0
    IMTLL(["a", "b", "c"]).backward(losses)
    assert CountBackward.calls == 1


def test_agrees_with_torchjd():
    scal = pytest.importorskip("torchjd.scalarization")
    ours, ref = IMTLL(["a", "b", "c"]), scal.IMTLL(3)
    with torch.no_grad():
        ours.log_scales.copy_(torch.tensor([0.3, -0.2, 1.0]))
        ref.log_scale.copy_(torch.tensor([0.3, -0.2, 1.0]))
    p1 = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p2 = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    targets = torch.tensor([[0.5, 1.0], [2.0, 0.1], [1.0, 1.0]])
    step = ours.backward([((p1 - t) ** 2).sum() for t in targets])
    total = ref(torch.stack([((p2 - t) ** 2).sum() for t in targets]))
    total.backward()
    torch.testing.assert_close(step.loss, total.detach())
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(ours.log_scales.grad, ref.log_scale.grad)
