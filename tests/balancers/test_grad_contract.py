"""Gradient balancers beyond the generic contract of test_balancer_contract.py: forced answers on
degenerate inputs, backward-pass counts per strategy, state that matters on resume,
validation, the features mode, diagnostics."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from _inputs import CountBackward, Net, batches, degenerate_jacobians, run

from mtlkit import balancers
from mtlkit.balancers._gramian import BargainingWarning
from mtlkit.engine._grads import AUTO_CHUNK

TASKS = ["a", "b", "c"]

# name -> constructor hyperparameters (besides tasks)
GRADIENT_BALANCERS_UNDER_TEST: dict[str, dict] = {
    "mgda": {},
    "mgda_loss+": {"normalization": "loss+"},
    "mgda_ub": {"grad_on": "features"},
    "pcgrad": {"seed": 1},
    "graddrop": {"leak": 0.2, "seed": 1},
    "gradvac": {"beta": 0.5},
    "gradvac_whole": {"beta": 0.5, "group": "whole"},
    "cagrad": {},
    "imtl": {},
    "imtl_l": {"loss_scale": True},
    "nash_mtl": {},
    "aligned_mtl": {},
    "upgrad": {},
    "db_mtl": {},
    "grad_norm_scaling": {},
    "gradnorm": {},
    "torchjd": {"weighting": "UPGradWeighting"},
}


def registry_name(key: str) -> str:
    return {"mgda_loss+": "mgda", "mgda_ub": "mgda", "gradvac_whole": "gradvac",
            "imtl_l": "imtl"}.get(key, key)


def make(key: str, tasks=TASKS, **override):
    hparams = {**GRADIENT_BALANCERS_UNDER_TEST[key], **override}
    if key == "torchjd":
        pytest.importorskip("torchjd")
    return balancers.create(registry_name(key), tasks=tasks, **hparams)


# ------------------------------------------------------------------ degenerate inputs
@pytest.mark.parametrize("k", [2, 3])
def test_forced_answers_on_degenerate_inputs(k):
    """Where the answer is forced by the method (the generic properties, finite weights, zero
    and identical gradients, scales, run on every method in test_balancer_contract.py): Nash-MTL says
    that opposite gradients have no bargaining solution and makes no update; MGDA makes none
    at a Pareto-stationary point (0 in the hull), up to float32 rounding."""
    cases = degenerate_jacobians(k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update, _ = run(make("nash_mtl", tasks=TASKS[:k]), cases["opposite"])
    assert any(issubclass(w.category, BargainingWarning) for w in caught)
    assert (update == 0).all()
    for key in ("mgda", "mgda_loss+"):
        for case in ("opposite", "one_zero"):
            jac = cases[case]
            update, _ = run(make(key, tasks=TASKS[:k]), jac)
            assert float(update.norm()) <= 1e-6 * float(jac.norm()), (key, case)


# ------------------------------------------------------------------ backward passes
def trunk_passes(b, *, tasks=TASKS, steps=2) -> int:
    torch.manual_seed(0)
    model = Net(list(tasks))
    CountBackward.calls = 0
    for x, y in batches(steps, len(tasks)):
        model.zero_grad()
        losses, z = model.losses(x, y)
        b.backward(losses, shared=model.shared(), features=z)
    return CountBackward.calls


@pytest.mark.parametrize(("strategy", "chunk", "expected"),
                         [("batched", None, 1), ("loop", None, 5), ("batched", 2, 3),
                          ("auto", None, -(-5 // AUTO_CHUNK["cpu"]))])  # auto: chunked
def test_backward_passes_per_strategy(strategy, chunk, expected):
    tasks = ["a", "b", "c", "d", "e"]
    b = balancers.create("upgrad", tasks=tasks, strategy=strategy, chunk_size=chunk)
    assert trunk_passes(b, tasks=tasks, steps=1) == expected


# ------------------------------------------------------------------ resume
def train(model, b, data, opt):
    out = []
    for x, y in data:
        opt.zero_grad()
        losses, z = model.losses(x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BargainingWarning)
            out.append(b.backward(losses, shared=model.shared(), features=z).weights)
        opt.step()
    return out


def test_stateful_balancers_would_diverge_without_their_state():
    """The resume test above can fail: a fresh GradVac (targets 0) or GradNorm (weights 1) in
    the middle of a run gives other weights than the resumed one."""
    data = batches(8, 3, seed=1)
    for key in ("gradvac", "gradnorm", "pcgrad"):
        torch.manual_seed(2)
        model = Net(TASKS, scales=[1.0, 10.0, 0.1])
        b = make(key)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        train(model, b, data[:4], opt)
        state = copy.deepcopy(model.state_dict())
        resumed = train(model, b, data[4:], opt)
        model.load_state_dict(state)
        fresh = make(key)
        assert train(model, fresh, data[4:], torch.optim.SGD(model.parameters(), lr=0.05)) != \
            resumed, key


def test_stateful_buffers_are_saved():
    b = make("gradvac")
    run(b, degenerate_jacobians()["rank_one"] + torch.eye(3, 5, dtype=torch.float64))
    assert b.state_dict()["targets"].shape == (1, 3, 3)
    d = make("db_mtl")
    run(d, torch.eye(3, 5, dtype=torch.float64))
    assert d.state_dict()["grad_ema"].shape == (3, 5)
    fresh = make("db_mtl")
    fresh.load_state_dict(d.state_dict())
    assert torch.equal(fresh.grad_ema, d.grad_ema)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("name", "hparams", "msg"),
    [
        ("cagrad", {"c": -0.1}, "c must be finite and >= 0"),
        ("cagrad", {"rescale": 3}, "rescale must be 0, 1 or 2"),
        ("mgda", {"normalization": "max"}, "normalization must be one of"),
        ("nash_mtl", {"max_norm": -1.0}, "max_norm"),
        ("nash_mtl", {"on_failure": "ignore"}, "on_failure"),
        ("aligned_mtl", {"scale_mode": "max"}, "scale_mode"),
        ("upgrad", {"reg_eps": -1.0}, "reg_eps"),
        ("db_mtl", {"beta": 1.0}, r"beta must be in \[0, 1\)"),
        ("db_mtl", {"eps": 0.0}, "eps must be finite and > 0"),
        ("gradvac", {"beta": 1.5}, r"beta must be in \[0, 1\]"),
        ("gradvac", {"group": "layers"}, "group must be 'layer', 'tensor', 'whole' or"),
        ("graddrop", {"leak": 2.0}, r"leak for task 'a' must be in \[0, 1\]"),
        ("pcgrad", {"seed": -1}, "seed must be a non-negative integer"),
        ("gradnorm", {"lr": 0.0}, "lr must be finite and > 0"),
        ("upgrad", {"grad_on": "outputs"}, "grad_on must be one of"),
        ("upgrad", {"chunk_size": 0}, "chunk_size must be a positive integer"),
    ],
)
def test_invalid_hyperparameters(name, hparams, msg):
    with pytest.raises(ValueError, match=msg):
        balancers.create(name, tasks=["a", "b"], **hparams)


def test_missing_inputs_are_named():
    p = torch.nn.Parameter(torch.zeros(2))
    losses = [p.sum() + 1, 2 * p.sum() + 1]
    with pytest.raises(ValueError, match="pass shared=<the shared parameters>"):
        balancers.create("upgrad", tasks=["a", "b"]).backward(losses)
    with pytest.raises(ValueError, match="pass shared=<the shared parameters>"):
        balancers.create("gradnorm", tasks=["a", "b"]).backward(losses)
    with pytest.raises(ValueError, match="needs features=<the last shared representation>"):
        balancers.create("mgda", tasks=["a", "b"], grad_on="features").backward(losses, shared=[p])


def test_torchjd_wrapper_validation():
    pytest.importorskip("torchjd")
    with pytest.raises(ValueError, match="unknown TorchJD weighting 'Nope'"):
        balancers.create("torchjd", tasks=["a"], weighting="Nope")
    with pytest.raises(TypeError, match="must be a torchjd.aggregation.Weighting"):
        balancers.create("torchjd", tasks=["a"], weighting=object())


# ------------------------------------------------------------------ features mode
class IdentityTrunk(torch.nn.Module):
    """Features that are the shared parameter itself (through an identity op): the features
    mode and the parameters mode see exactly the same task gradients."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(k))

    def losses(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        z = self.w.clone()
        return [(i + 1.0) * (h(z).squeeze(-1) - y[:, i]).pow(2).mean()
                for i, h in enumerate(self.heads)], z


@pytest.mark.parametrize(
    "key", sorted(set(GRADIENT_BALANCERS_UNDER_TEST) - {"gradnorm", "mgda_ub"}))
def test_features_mode_equals_parameters_mode_for_an_identity_trunk(key):
    """Every Gram-based (and Jacobian-based) method accepts grad_on="features"; with an
    identity trunk it gives the parameters mode's weights and update, over several steps."""
    torch.manual_seed(3)
    ref = IdentityTrunk(3)
    ys = [torch.randn(6, 3) for _ in range(3)]
    results = {}
    for grad_on in ("parameters", "features"):
        model = copy.deepcopy(ref)
        b = make(key, grad_on=grad_on)
        assert b.grad_on == grad_on
        out = []
        for y in ys:
            model.zero_grad()
            losses, z = model.losses(y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BargainingWarning)
                step = b.backward(losses, shared=[model.w], features=z)
            out.append((step.weight_tensor, [p.grad.clone() for p in model.parameters()]))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        results[grad_on] = out
    for (w_p, g_p), (w_f, g_f) in zip(results["parameters"], results["features"]):
        torch.testing.assert_close(w_f, w_p, rtol=1e-5, atol=1e-6)
        for a, b_ in zip(g_f, g_p):
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_mgda_ub_combines_the_feature_gradients_and_backpropagates_once():
    """MGDA-UB (Sener & Koltun, Section 3.3): the min-norm weights of the gradients w.r.t. the
    shared representation z; the trunk gets sum_k w_k dL_k/dtheta, each head its own
    gradient."""
    torch.manual_seed(4)
    model = Net(["a", "b"], scales=[1.0, 5.0])
    x, y = batches(1, 2, seed=3)[0]
    losses, z = model.losses(x, y)
    dz = [torch.autograd.grad(losses[t], z, retain_graph=True)[0].flatten() for t in "ab"]
    g11, g12, g22 = dz[0] @ dz[0], dz[0] @ dz[1], dz[1] @ dz[1]
    gamma = ((g22 - g12) / (g11 + g22 - 2 * g12)).clamp(0, 1)
    w = torch.stack([gamma, 1 - gamma])
    trunk = [torch.autograd.grad(losses[t], model.shared(), retain_graph=True) for t in "ab"]
    heads = [torch.autograd.grad(losses[t], list(model.heads[t].parameters()),
                                 retain_graph=True) for t in "ab"]
    assert 0 < float(gamma) < 1  # an interior point: the weights matter
    CountBackward.calls = 0
    step = balancers.create("mgda", tasks=["a", "b"], grad_on="features").backward(
        losses, shared=model.shared(), features=z)
    assert CountBackward.calls == 1  # one backward through the trunk
    torch.testing.assert_close(step.weight_tensor, w)
    for i, p in enumerate(model.shared()):
        torch.testing.assert_close(p.grad, w[0] * trunk[0][i] + w[1] * trunk[1][i])
    for t, own in zip("ab", heads):
        for p, g in zip(model.heads[t].parameters(), own):
            torch.testing.assert_close(p.grad, g)
    # the Gram matrix reported is that of the feature gradients
    gram = torch.stack([torch.stack([g11, g12]), torch.stack([g12, g22])])
    torch.testing.assert_close(step.gramian, gram.double())  # float64, at a safe scale


# ------------------------------------------------------------------ diagnostics
def test_step_reports_the_cosine_similarity_of_the_task_gradients():
    jac = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-4.0, 3.0, 0.0], [1.0, 1.0, 1.0]],
                       dtype=torch.float64)
    _, step = run(balancers.create("upgrad", tasks=list("abcd")), jac, dtype=torch.float64)
    n = math.sqrt(3.0)
    expected = torch.tensor([[1.0, 0.0, 0.0, 7 / (5 * n)],
                             [0.0, 0.0, 0.0, 0.0],  # a zero gradient: cosine 0, even with itself
                             [0.0, 0.0, 1.0, -1 / (5 * n)],
                             [7 / (5 * n), 0.0, -1 / (5 * n), 1.0]], dtype=torch.float64)
    torch.testing.assert_close(step.cosine, expected)
    # the same at extreme scales (no overflow or underflow in the normalisation, float32)
    for scale in (1e-10, 1e15):
        _, step = run(balancers.create("mgda", tasks=list("abcd")), jac * scale)
        torch.testing.assert_close(step.cosine, expected, rtol=1e-5, atol=1e-6)
    # loss-weighting methods and GradNorm never form the Gram matrix
    p = torch.nn.Parameter(torch.zeros(3))
    for name in ("ew", "gradnorm"):
        step = balancers.create(name, tasks=["a", "b"]).backward(
            [p.sum() + 1, (2 * p).sum() + 1], shared=[p])
        assert step.gramian is None and step.cosine is None


def test_features_mode_cosine_is_that_of_the_feature_gradients():
    torch.manual_seed(5)
    model = Net(TASKS)
    x, y = batches(1, 3, seed=2)[0]
    losses, z = model.losses(x, y)
    dz = torch.stack([torch.autograd.grad(losses[t], z, retain_graph=True)[0].flatten()
                      for t in TASKS])
    unit = dz / dz.norm(dim=1, keepdim=True)
    step = balancers.create("imtl", tasks=TASKS, grad_on="features").backward(
        losses, shared=model.shared(), features=z)
    torch.testing.assert_close(step.cosine, (unit @ unit.T).double(), rtol=1e-6, atol=1e-7)
