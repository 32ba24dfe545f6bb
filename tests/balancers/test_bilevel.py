"""Auto-Lambda: the hypergradient equals autograd through the virtual step, the update, the
restored parameters, the held-out interface and its errors, hard inputs, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mtlkit import balancers
from mtlkit.balancers._bilevel import AutoLambda, lookahead_hypergradient

F64 = torch.float64
TASKS = ["a", "b", "c"]


class Tiny(nn.Module):
    def __init__(self, scales=(1.0, 1.0, 1.0)) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Linear(4, 5).double()
        self.heads = nn.ModuleList(nn.Linear(5, 1).double() for _ in TASKS)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        self.scales = scales

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        return [h(z).squeeze(-1) for h in self.heads]


def batch(seed: int, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g, dtype=dtype), torch.randn(8, 3, generator=g,
                                                                   dtype=dtype)


def losses_fn(model, x, y, params=None):
    out = model(x) if params is None else functional_call(model, params, (x,))
    return {t: s * ((o - y[:, i]) ** 2).mean()
            for i, (t, o, s) in enumerate(zip(TASKS, out, model.scales))}


def test_hypergradient_is_autograd_through_the_virtual_step():
    model = Tiny()
    (x, y), (xv, yv) = batch(0), batch(1)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    lam = torch.tensor([0.1, 0.3, 0.2], dtype=F64, requires_grad=True)
    train = losses_fn(model, x, y)
    grads = [torch.autograd.grad(train[t], params, retain_graph=True, allow_unused=True,
                                 materialize_grads=True) for t in TASKS]
    virtual = {n: p.detach() - 0.5 * sum(lam[k] * grads[k][i] for k in range(3))
               for i, (n, p) in enumerate(zip(names, params))}
    target = sum(losses_fn(model, xv, yv, virtual).values())
    (expected,) = torch.autograd.grad(target, lam)
    # Ours: -alpha <g_k, grad L_val(theta')>.
    theta_prime = {n: v.detach().requires_grad_(True) for n, v in virtual.items()}
    held = torch.autograd.grad(sum(losses_fn(model, xv, yv, theta_prime).values()),
                               list(theta_prime.values()))
    per_task = [torch.stack([grads[k][i] for k in range(3)]) for i in range(len(params))]
    torch.testing.assert_close(lookahead_hypergradient(per_task, held, 0.5), expected)


def _step(b, model, seed, primary_only=None):
    x, y = batch(seed)
    xv, yv = batch(1000 + seed)
    model.zero_grad()
    step = b.backward(losses_fn(model, x, y), held_out=lambda: losses_fn(model, xv, yv),
                      parameters=model.parameters())
    return step


def test_one_step_moves_lambda_by_adam_and_updates_every_parameter_with_the_new_weights():
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = AutoLambda(TASKS, lr=0.01, virtual_lr=0.5)
    x, y = batch(0)
    xv, yv = batch(1000)
    # Reference hypergradient, computed independently with autograd through theta'.
    names = list(before)
    lam = torch.full((3,), 0.1, dtype=F64, requires_grad=True)
    params = list(model.parameters())
    train = losses_fn(model, x, y)
    grads = [torch.autograd.grad(train[t], params, retain_graph=True, materialize_grads=True)
             for t in TASKS]
    virtual = {n: p.detach() - 0.5 * sum(lam[k] * grads[k][i] for k in range(3))
               for i, (n, p) in enumerate(zip(names, params))}
    (hyper,) = torch.autograd.grad(sum(losses_fn(model, xv, yv, virtual).values()), lam)
    step = _step(b, model, 0)
    # Adam's first step moves each weight by lr against the sign of its gradient.
    torch.testing.assert_close(step.weight_tensor, 0.1 - 0.01 * torch.sign(hyper), atol=1e-7,
                               rtol=0)
    # The parameters are back where they were, bit for bit; heads included, every parameter
    # received sum_k lambda_k grad L_k at the new weights.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        want = sum(step.weight_tensor[k] * grads[k][names.index(n)] for k in range(3))
        torch.testing.assert_close(p.grad, want)


def test_primary_tasks_alone_drive_lambda():
    model = Tiny()
    b = AutoLambda(TASKS, primary=["a"], lr=0.01)
    x, y = batch(0)
    xv, yv = batch(1000)
    calls = []

    def held_out():
        out = losses_fn(model, xv, yv)
        out["b"] = out["b"] * 1e6  # would dominate if it counted
        calls.append(1)
        return out

    ref = AutoLambda(TASKS, primary=["a"], lr=0.01)
    step = b.backward(losses_fn(model, x, y), held_out=held_out, parameters=model.parameters())
    model.zero_grad()
    step_ref = _step(ref, model, 0)
    assert calls == [1]
    torch.testing.assert_close(step.weight_tensor, step_ref.weight_tensor)
    assert b.primary == ("a",) and AutoLambda(TASKS).primary == tuple(TASKS)


def test_resume_after_20_steps_equals_40_steps():
    def run(b, model, opt, seeds):
        out = []
        for s in seeds:
            out.append(_step(b, model, s).weight_tensor.clone())
            opt.step()
        return out

    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    full = AutoLambda(TASKS, lr=0.01, virtual_lr=0.05)
    ref = run(full, model, opt, range(40))
    model2 = Tiny()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    first = AutoLambda(TASKS, lr=0.01, virtual_lr=0.05)
    run(first, model2, opt2, range(20))
    second = AutoLambda(TASKS, lr=0.01, virtual_lr=0.05)
    second.load_state_dict(first.state_dict())
    got = run(second, model2, opt2, range(20, 40))
    for a, r in zip(got, ref[20:]):
        assert torch.equal(a, r)
    assert {"weights", "adam.m", "adam.v", "adam.t"} <= set(first.state_dict())


def test_hard_inputs_stay_finite_in_float32():
    for scales in [(1e-4, 1.0, 1e4), (0.0, 0.0, 0.0)]:
        model = Tiny(scales).float()
        b = AutoLambda(TASKS)
        x, y = batch(0, torch.float32)
        xv, yv = batch(1, torch.float32)
        step = b.backward(losses_fn(model, x, y),
                          held_out=lambda m=model, a=xv, c=yv: losses_fn(m, a, c),
                          parameters=model.parameters())
        assert torch.isfinite(step.weight_tensor).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    one = nn.Parameter(torch.tensor([2.0]))
    step = AutoLambda(["a"]).backward([one.sum() ** 2], held_out=lambda: [(one.sum() - 3) ** 2],
                                      parameters=[one])
    assert step.weight_tensor.shape == (1,) and torch.isfinite(one.grad).all()


def test_errors_name_the_missing_input_and_leave_everything_unchanged():
    model = Tiny()
    b = balancers.create("auto_lambda", tasks=TASKS)
    assert b.needs_held_out_batch and not getattr(b, "needs_second_batch", False)
    x, y = batch(0)
    with pytest.raises(ValueError, match="held_out"):
        b.backward(losses_fn(model, x, y), parameters=model.parameters())
    with pytest.raises(TypeError, match="held_out"):
        b.backward(losses_fn(model, x, y), held_out=3, parameters=model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def broken():
        return {"a": torch.tensor(1.0)}

    with pytest.raises(KeyError, match="missing loss"):
        b.backward(losses_fn(model, x, y), held_out=broken, parameters=model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # restored after the failed held-out call
    assert int(b.step) == 0 and int(b.adam.t) == 0
    assert torch.equal(b.weights, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="primary"):
        balancers.create("auto_lambda", tasks=TASKS, primary=["z"])
