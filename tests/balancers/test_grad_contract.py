"""Contract of every gradient balancer: registry, degenerate inputs, backward-pass counts,
exact resume, validation."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from _inputs import CountBackward, Net, batches, degenerate_jacobians, run, scaled_base

from mtlkit import balancers
from mtlkit.balancers._gramian import BargainingWarning
from mtlkit.engine._grads import AUTO_CHUNK, auto_strategy

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


def test_registry_lists_every_gradient_method():
    names = {registry_name(k) for k in GRADIENT_BALANCERS_UNDER_TEST}
    assert names <= set(balancers.available())
    for name in names - {"torchjd"}:
        cls = balancers.get(name)
        assert cls.requires in ("last_shared", "gramian", "block_gramian", "jacobian")
        # IMTL (ICLR 2021) has no arXiv version; gradient-norm scaling is a baseline
        doc = cls.__doc__ or ""
        cited = {"imtl": "OpenReview IMPnRXEWpvr", "grad_norm_scaling": "A common baseline"}
        assert cited.get(name, "arXiv:") in doc, name


# ------------------------------------------------------------------ degenerate inputs
DEGENERATE_CASES = [(k, case) for k in (2, 3) for case in degenerate_jacobians(k)
                    if not (k == 3 and case == "single_task")]
#: TorchJD's UPGrad treats a Gram matrix of trace below 1e-4 as zero (its mean weights then give
#: another direction): the scale check does not apply to it.
SCALE_DEPENDENT = {"torchjd"}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def assert_parallel(d: torch.Tensor, g: torch.Tensor, what) -> None:
    """d = c g with c > 0."""
    assert float(d.norm()) > 0, what
    assert cos(d, g) == pytest.approx(1.0, abs=1e-5), (what, d, g)


@pytest.mark.parametrize(("k", "case"), DEGENERATE_CASES, ids=[f"K{k}-{c}" for k, c in
                                                              DEGENERATE_CASES])
@pytest.mark.parametrize("key", sorted(set(GRADIENT_BALANCERS_UNDER_TEST) - {"mgda_ub"}))
def test_degenerate_inputs_give_a_finite_clear_update(key, k, case):
    """Every gradient balancer, on each degenerate Jacobian: finite weights, a finite update in
    ``.grad`` (two steps, so the state is exercised), no warning except Nash-MTL's documented
    one, and where the answer is forced, that answer. (MGDA-UB sees the same Gram matrices
    as MGDA; the features mode is tested below.)"""
    jac = degenerate_jacobians(k)[case]
    b = make(key, tasks=TASKS[: jac.shape[0]])
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            update, step = run(b, jac)
        unexpected = [w for w in caught
                      if not (key == "nash_mtl" and issubclass(w.category, BargainingWarning))]
        assert not unexpected, [str(w.message) for w in unexpected]
        assert update is not None and torch.isfinite(update).all(), update
        assert torch.isfinite(step.weight_tensor).all(), step.weights
        assert math.isfinite(step.loss.item())
        g = jac[0].float()
        if case == "zero":
            assert (update == 0).all()
        elif case == "identical":  # any sensible combination of K copies of g is c g, c >= 0
            assert float(update.norm()) == 0 or cos(update, g) == pytest.approx(1.0, abs=1e-5)
        elif case == "single_task":
            assert_parallel(update, g, key)
    if key == "nash_mtl" and case == "opposite":  # no bargaining solution: said so
        assert any(issubclass(w.category, BargainingWarning) for w in caught)
        assert (update == 0).all()
    if key.startswith("mgda") and case in ("opposite", "one_zero"):
        # 0 is in the convex hull (Pareto-stationary): no update, up to float32 rounding
        assert float(update.norm()) <= 1e-6 * float(jac.norm())


@pytest.mark.parametrize("case", ["tiny", "huge"])
@pytest.mark.parametrize("key", sorted(set(GRADIENT_BALANCERS_UNDER_TEST) - {"mgda_ub"}))
def test_rescaling_every_gradient_keeps_the_direction(key, case):
    """Gradients 1e-10 or 1e15 times a generic Jacobian: the update has the same direction as
    for the Jacobian itself (no epsilon in a denominator that matters at one scale only)."""
    if key in SCALE_DEPENDENT:
        pytest.skip("TorchJD's UPGrad has a scale-dependent zero threshold")
    base = scaled_base(3)
    ref, _ = run(make(key), base)
    update, _ = run(make(key), degenerate_jacobians(3)[case])
    assert cos(update, ref) == pytest.approx(1.0, abs=1e-5), (update, ref)


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


@pytest.mark.parametrize("key", sorted(GRADIENT_BALANCERS_UNDER_TEST))
def test_no_backward_pass_after_the_weights_are_known(key):
    """The trunk below its first layer sees one (vectorised) backward per step in parameters
    mode (K ordinary ones where ``auto`` loops: few tasks on CPU), one in features mode, and
    one for GradNorm (its per-task pass stops above)."""
    b = make(key)
    looped = (b.requires != "last_shared" and b.grad_on == "parameters"
              and auto_strategy(len(TASKS), "cpu")[0] == "loop")
    assert trunk_passes(b) == 2 * (len(TASKS) if looped else 1)


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


#: Balancers with state beyond the step counter (learned weights and their Adam moments,
#: targets, gradient averages, learned loss scales) or with per-step randomness: resumed after
#: 20 of 40 steps. The others (their state is the step counter) after 6 of 12.
STATEFUL = {"gradnorm", "gradvac", "gradvac_whole", "pcgrad", "graddrop", "db_mtl", "imtl_l"}


@pytest.mark.parametrize("key", sorted(GRADIENT_BALANCERS_UNDER_TEST))
def test_resume_follows_the_same_trajectory(key):
    """n steps, save, load into fresh objects, n more steps == 2n uninterrupted steps: same
    weights at every step and bit-identical parameters."""
    n = 20 if key in STATEFUL else 6
    data = batches(2 * n, 3, seed=1)
    torch.manual_seed(2)
    ref_model = Net(TASKS, scales=[1.0, 10.0, 0.1])
    model = copy.deepcopy(ref_model)
    ref_b = make(key)
    ref = train(ref_model, ref_b, data,
                torch.optim.SGD([*ref_model.parameters(), *ref_b.parameters()], lr=0.05))

    b = make(key)
    opt = torch.optim.SGD([*model.parameters(), *b.parameters()], lr=0.05)
    first = train(model, b, data[:n], opt)
    buf = io.BytesIO()
    torch.save({"b": b.state_dict(), "m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = Net(TASKS, scales=[1.0, 10.0, 0.1])
    model2.load_state_dict(saved["m"])
    b2 = make(key)
    b2.load_state_dict(saved["b"])
    opt2 = torch.optim.SGD([*model2.parameters(), *b2.parameters()], lr=0.05)
    opt2.load_state_dict(saved["o"])
    second = train(model2, b2, data[n:], opt2)
    assert first + second == ref
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for (name, x), (_, y) in zip(b2.state_dict().items(), ref_b.state_dict().items()):
        assert torch.equal(x, y), name
    assert len(set(map(tuple, (w.values() for w in ref)))) > 1  # the weights did change


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
