"""Contract of every gradient balancer: registry, degenerate inputs, backward-pass counts,
exact resume, validation."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from _inputs import CountBackward, Net, batches, degenerate_jacobians, run

from mtlkit import balancers
from mtlkit.balancers._gramian import BargainingWarning

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
        assert cls.__doc__ and ("arXiv:" in cls.__doc__ or name in ("imtl", "grad_norm_scaling"))


# ------------------------------------------------------------------ degenerate inputs
@pytest.mark.parametrize("key", sorted(GRADIENT_BALANCERS_UNDER_TEST))
def test_degenerate_inputs_give_finite_weights(key):
    if key == "mgda_ub":
        pytest.skip("features mode: covered with the same Gram matrices by 'mgda'")
    for case, jac in degenerate_jacobians().items():
        k = jac.shape[0]
        b = make(key, tasks=TASKS[:k])
        for _ in range(2):  # a second step exercises state (EMA, targets, Adam)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                update, step = run(b, jac)
            unexpected = [w for w in caught
                          if not (key == "nash_mtl" and issubclass(w.category, BargainingWarning))]
            assert not unexpected, (key, case, [str(w.message) for w in unexpected])
            assert torch.isfinite(step.weight_tensor).all(), (key, case, step.weights)
            assert torch.isfinite(update).all(), (key, case, update)
            assert math.isfinite(step.loss.item())
        if key == "nash_mtl" and case == "opposite":
            assert any(issubclass(w.category, BargainingWarning) for w in caught)


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
    mode, one in features mode, and one for GradNorm (its per-task pass stops above)."""
    assert trunk_passes(make(key)) == 2


@pytest.mark.parametrize(("strategy", "chunk", "expected"),
                         [("batched", None, 1), ("loop", None, 5), ("batched", 2, 3),
                          ("auto", None, 2)])  # auto on CPU: chunks of 4
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


@pytest.mark.parametrize("key", sorted(GRADIENT_BALANCERS_UNDER_TEST))
def test_resume_follows_the_same_trajectory(key):
    data = batches(12, 3, seed=1)
    torch.manual_seed(2)
    ref_model = Net(TASKS, scales=[1.0, 10.0, 0.1])
    model = copy.deepcopy(ref_model)
    ref_b = make(key)
    ref = train(ref_model, ref_b, data,
                torch.optim.SGD([*ref_model.parameters(), *ref_b.parameters()], lr=0.05))

    b = make(key)
    opt = torch.optim.SGD([*model.parameters(), *b.parameters()], lr=0.05)
    first = train(model, b, data[:6], opt)
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
    second = train(model2, b2, data[6:], opt2)
    assert first + second == ref
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


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
        ("gradvac", {"group": "layer"}, "group must be"),
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
