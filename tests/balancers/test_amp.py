"""Mixed precision: ``balancer.backward(losses, ..., scaler=scaler)`` for every method.

* The update with a gradient scaler (losses scaled by 2^16 inside the balancer, the scaler
  unscaling before the optimiser step) equals the update without one: weights, norms and Gram
  matrices are computed on unscaled quantities (before this, methods invariant to the loss
  scale, such as geometric or Nash-MTL, wrote an update 65536x too small).
* A step whose gradients are not finite (the scaler skips it) leaves the balancer's
  ``state_dict()`` exactly as before and the parameters untouched; GradNorm stays finite.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mtlkit import balancers

TASKS = ["a", "b", "c"]
NEEDS = {"fixed": {"weights": {"a": 0.5, "b": 1.0, "c": 2.0}},
         "prior_loss": {"priors": {"a": 1.0, "b": 2.0, "c": 0.5}},
         "initial_loss": {"num_batches": 1}, "dwa": {"per_batch": True}}
CASES = [n for n in balancers.available() if n != "torchjd"] + ["mgda@features"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)

    def losses(self, x, y, poison: bool = False):
        z = self.trunk(x)
        if poison:  # finite losses, non-finite gradients (an fp16 overflow in the backward)
            z.register_hook(lambda g: g * float("inf"))
        return {t: (h(z).squeeze(-1) - y[:, i]).pow(2).mean()
                for i, (t, h) in enumerate(zip(TASKS, self.heads))}, z


def make(case: str):
    name, _, mode = case.partition("@")
    hp = dict(NEEDS.get(name, {}))
    if mode:
        hp["grad_on"] = mode
    return balancers.create(name, tasks=TASKS, **hp)


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g) * torch.tensor(
        [1.0, 5.0, 0.2])


def train(case: str, scaler: torch.amp.GradScaler | None, steps: int = 3):
    net, b = Net(), make(case)
    opt = torch.optim.SGD([*net.parameters(), *b.parameters()], lr=0.05)
    weights = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        ls, z = net.losses(x, y)
        context = {"kpi": {t: 0.5 for t in TASKS}} if "kpi" in b.context_keys else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Nash-MTL's bargaining warning
            out = b.backward(ls, shared=net.trunk.parameters(), features=z, scaler=scaler,
                             **context)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if b.needs_after_step:
            with torch.no_grad():
                b.after_step(net.losses(x, y)[0])
        weights.append(out.weight_tensor)
    return net, b, opt, torch.stack(weights)


@pytest.mark.parametrize("case", CASES)
def test_scaled_update_equals_the_unscaled_one(case) -> None:
    net, b, _, weights = train(case, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    net_s, b_s, _, weights_s = train(case, scaler)
    assert scaler.get_scale() == 2.0**16  # no step was skipped
    torch.testing.assert_close(weights_s, weights, rtol=1e-4, atol=1e-6)
    for p, q in zip(net_s.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for (k, v), (_, w) in zip(b_s.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("case", CASES)
def test_skipped_step_leaves_state_and_parameters_untouched(case) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    net, b, opt, _ = train(case, scaler, steps=2)
    state = {k: v.clone() for k, v in b.state_dict().items()}
    params = [p.detach().clone() for p in [*net.parameters(), *b.parameters()]]
    x, y = batch(7)
    opt.zero_grad()
    ls, z = net.losses(x, y, poison=True)
    context = {"kpi": {t: 0.5 for t in TASKS}} if "kpi" in b.context_keys else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.backward(ls, shared=net.trunk.parameters(), features=z, scaler=scaler, **context)
    scaler.step(opt)
    scaler.update()
    if b.needs_after_step:
        with torch.no_grad():
            b.after_step(net.losses(x, y)[0])
    assert scaler.get_scale() == 2.0**15  # the scaler did skip the step
    after = b.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    for p, q in zip([*net.parameters(), *b.parameters()], params):
        assert torch.equal(p.detach(), q)
    # the next (finite) step is an ordinary one: finite weights
    opt.zero_grad()
    ls, z = net.losses(*batch(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = b.backward(ls, shared=net.trunk.parameters(), features=z, scaler=scaler, **context)
    assert torch.isfinite(out.weight_tensor).all()
    assert int(b.step) == 3


def test_fp16_autocast_update_is_close_to_fp32() -> None:
    """Under fp16 autocast with a scaler, a loss-scale-invariant method (geometric) writes
    the fp32 update to autocast tolerance (it wrote 1/65536 of it before)."""
    net, _, _, _ = train("geometric", None, steps=1)
    net16 = Net()
    b = make("geometric")
    opt = torch.optim.SGD(net16.parameters(), lr=0.05)
    # 2^10: large enough to matter, small enough for this problem's fp16 backward
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(0)
    with torch.autocast("cpu", dtype=torch.float16):
        ls, z = net16.losses(x, y)
        b.backward(ls, shared=net16.trunk.parameters(), features=z, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # the step was taken
    start = Net()
    d16 = torch.cat([(p - p0).detach().flatten() for p, p0 in zip(net16.parameters(), start.parameters())])
    d32 = torch.cat([(p - p0).detach().flatten() for p, p0 in zip(net.parameters(), start.parameters())])
    assert float(d16.norm() / d32.norm()) == pytest.approx(1.0, rel=0.05)
    assert float(d16 @ d32 / (d16.norm() * d32.norm())) > 0.99
