"""Every balancer with a ``torch.compile``-d model gives the eager model's update.

A compiled model's autograd graph holds one node per compiled graph (AOTAutograd's
``CompiledFunctionBackward``) with every parameter behind it, and that node's backward cannot
run under ``torch.vmap``. The engine walks such nodes by output index and runs its per-task
passes sequentially through them. ``HardSharing`` ends its trunk with a graph break, so the
features stay a tensor the losses go through (``grad_on="features"``); a user model compiled
whole has its features and losses in one node: parameters mode works, features mode says why
it cannot.

The default suite compiles with the ``aot_eager`` backend: the same AOTAutograd graph and
compiled backward node as inductor, without generating C++ (inductor takes 10-60 s per graph
on a shared CPU). The slow test repeats the sweep with inductor.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from mtlkit import balancers
from mtlkit.nn import HardSharing

#: five tasks: more than the CPU loop threshold, so "auto" would vectorise
TASKS = ["a", "b", "c", "d", "e"]
STEPS = 3
#: hyperparameters a method needs (the rest take the paper's defaults)
NEEDS = {"fixed": {"weights": dict(zip(TASKS, [0.5, 1.0, 2.0, 1.5, 0.2]))},
         "prior_loss": {"priors": dict(zip(TASKS, [1.0, 2.0, 0.5, 1.0, 3.0]))},
         "initial_loss": {"num_batches": 1}, "dwa": {"per_batch": True}}


def cases() -> list[tuple[str, str]]:
    out = []
    for name in balancers.available():
        if name == "torchjd":
            continue  # a wrapper around the same engine as upgrad
        grad_modes = ["parameters", "features"] if "grad_on" in _signature(name) else ["-"]
        out.extend((name, g) for g in grad_modes)
    return out


def _signature(name: str) -> str:
    import inspect

    return str(inspect.signature(balancers.get(name).__init__))


def model() -> HardSharing:
    torch.manual_seed(3)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    return HardSharing(trunk, {t: nn.Linear(6, 1) for t in TASKS})


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, 8, 5, generator=g), torch.randn(STEPS, 8, len(TASKS), generator=g) * 2


def train(net: HardSharing, forward: nn.Module, name: str, grad_on: str) -> dict:
    """STEPS SGD steps; the weights of each step and the final parameters."""
    hp = dict(NEEDS.get(name, {}))
    if grad_on != "-":
        hp["grad_on"] = grad_on
    b = balancers.create(name, tasks=TASKS, **hp)
    opt = torch.optim.SGD([*net.parameters(), *b.parameters()], lr=0.1)
    weights = []

    def losses(x, y):
        out = forward(x)
        return {t: (out[t].squeeze(-1) - y[:, i]).pow(2).mean() for i, t in enumerate(TASKS)}

    for x, y in zip(*data()):
        opt.zero_grad()
        ls = losses(x, y)
        context = {"kpi": {t: 0.5 for t in TASKS}} if "kpi" in b.context_keys else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Nash-MTL's bargaining warning on tiny problems
            step = b.backward(ls, shared=net.shared_parameters(), features=net.features,
                              **context)
        opt.step()
        if b.needs_after_step:
            with torch.no_grad():
                b.after_step(losses(x, y))
        weights.append(step.weight_tensor)
    return {"weights": torch.stack(weights), "params": [p.detach().clone()
                                                        for p in net.parameters()]}


@pytest.fixture(scope="module")
def compiled_aot() -> tuple[HardSharing, nn.Module]:
    net = model()
    return net, torch.compile(net, backend="aot_eager")


def check_compiled_equals_eager(net, compiled, name, grad_on) -> None:
    fresh = model()
    net.load_state_dict(fresh.state_dict())  # in place: the compiled graph is reused
    eager = train(fresh, fresh, name, grad_on)
    comp = train(net, compiled, name, grad_on)
    torch.testing.assert_close(comp["weights"], eager["weights"], rtol=1e-4, atol=1e-6)
    for p, q in zip(comp["params"], eager["params"]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "grad_on"), cases())
def test_compiled_model_gives_the_eager_update(compiled_aot, name, grad_on) -> None:
    net, compiled = compiled_aot
    check_compiled_equals_eager(net, compiled, name, grad_on)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "grad_on"), cases())
def test_inductor_compiled_model_gives_the_eager_update(name, grad_on) -> None:
    net = model()
    check_compiled_equals_eager(net, torch.compile(net), name, grad_on)


class Whole(nn.Module):
    """A user model compiled whole: the features and the head outputs leave one graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads], z


def test_model_compiled_whole_parameters_mode_and_features_mode_error() -> None:
    x, y = data()
    eager = Whole()
    net = copy.deepcopy(eager)
    compiled = torch.compile(net, backend="aot_eager")
    for m, fwd in ((eager, eager), (net, compiled)):
        out, z = fwd(x[0])
        ls = [(o - y[0][:, i]).pow(2).mean() for i, o in enumerate(out)]
        balancers.create("upgrad", tasks=TASKS).backward(ls, shared=m.trunk.parameters(),
                                                         features=z)
    for p, q in zip(net.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    out, z = compiled(x[0])
    ls = [o.pow(2).mean() for o in out]
    with pytest.raises(ValueError, match="one torch.compile-d graph"):
        balancers.create("upgrad", tasks=TASKS, grad_on="features").backward(
            ls, shared=net.trunk.parameters(), features=z)
    out, z = compiled(x[0])
    with pytest.raises(ValueError, match="strategy='batched' cannot run"):
        balancers.create("upgrad", tasks=TASKS, strategy="batched").backward(
            [o.pow(2).mean() for o in out], shared=net.trunk.parameters(), features=z)
