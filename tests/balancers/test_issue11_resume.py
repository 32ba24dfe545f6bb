"""The stateful methods of issue 11 (PCD, ExcessMTL, CR-MOGM, MetaBalance, IMTL-L): state in
registered buffers or parameters, an exact ``state_dict`` round trip, and 20 + 20 resumed steps
equal to 40 uninterrupted ones (and different from restarting the state at step 20)."""

from __future__ import annotations

import io

import pytest
import torch
from _inputs import Net, batches

from mtlkit import balancers

TASKS = ["a", "b", "c"]
STATEFUL = {
    "pcd": {"tau": 0.2, "beta": 0.9},
    "excess_mtl": {},
    "cr_mogm": {"method": "upgrad", "alpha": 0.8},
    "metabalance": {"beta": 0.5},
    "imtl_l": {},
}


def train(model, b, data, opt):
    out = []
    for x, y in data:
        opt.zero_grad()
        losses, z = model.losses(x, y)
        out.append(b.backward(losses, shared=model.shared(), features=z).weights)
        opt.step()
    return out


def fresh(name: str):
    torch.manual_seed(2)
    model = Net(TASKS, scales=[1.0, 10.0, 0.1])
    b = balancers.create(name, TASKS, **STATEFUL[name])
    opt = torch.optim.SGD([*model.parameters(), *b.parameters()], lr=0.05)
    return model, b, opt


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_resume_after_20_of_40_steps(name):
    n = 20
    data = batches(2 * n, 3, seed=1)
    ref_model, ref_b, ref_opt = fresh(name)
    ref = train(ref_model, ref_b, data, ref_opt)

    model, b, opt = fresh(name)
    first = train(model, b, data[:n], opt)
    assert b.state_dict(), name  # the state is registered
    buf = io.BytesIO()
    torch.save({"b": b.state_dict(), "m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, b2, opt2 = fresh(name)
    model2.load_state_dict(saved["m"])
    b2.load_state_dict(saved["b"])
    opt2.load_state_dict(saved["o"])
    for (key, x), (_, y) in zip(b2.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key  # round trip
    second = train(model2, b2, data[n:], opt2)
    assert first + second == ref
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for (key, x), (_, y) in zip(b2.state_dict().items(), ref_b.state_dict().items()):
        assert torch.equal(x, y), key

    # without the balancer's state the second half differs: the test above can fail
    model3, b3, opt3 = fresh(name)
    model3.load_state_dict(saved["m"])
    opt3.load_state_dict(saved["o"])
    assert train(model3, b3, data[n: n + 4], opt3) != second[:4], name


GRADIENT = ["config", "cr_mogm", "dualproj", "excess_mtl", "fairgrad", "krum", "metabalance",
            "pcd", "trimmed_mean"]


@pytest.mark.parametrize("name", GRADIENT)
def test_engine_options_reach_the_base_class_through_create(name):
    """``create`` accepts the engine options a method forwards with ``**options``, and the
    features mode gives a finite update."""
    b = balancers.create(name, TASKS, grad_on="features", strategy="loop", check_finite=False)
    assert (b.grad_on, b.strategy, b.check_finite) == ("features", "loop", False)
    torch.manual_seed(0)
    model = Net(TASKS)
    (x, y), = batches(1, 3)
    losses, z = model.losses(x, y)
    b.backward(losses, shared=model.shared(), features=z)
    assert all(torch.isfinite(p.grad).all() for p in model.shared())
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        balancers.create(name, TASKS, not_an_option=1)
