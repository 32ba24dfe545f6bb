"""The contract, checked on every registered balancer (``balancers.available()``).

Each property is a plain function of a factory (``make(tasks, **overrides) -> balancer``); the
tests run it on every registered method, so a newly registered method is covered without
touching this file, unless it is listed in ``EXCEPTIONS`` with the reason. The last tests run the
same functions on deliberately broken methods and check that they fail.
"""

from __future__ import annotations

import copy
import io
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _inputs import CountBackward, Net, batches, degenerate_jacobians, linear_losses, scaled_base

from mtlkit import balancers
from mtlkit.balancers import (
    BalanceStep,
    GradientBalancer,
    GramianWeighting,
    LossWeighting,
    register,
)
from mtlkit.balancers._registry import _REGISTRY
from mtlkit.engine._grads import auto_strategy

TASKS = ["a", "b", "c"]
Factory = Callable[..., Any]

#: Hyperparameters of the methods that have required ones (per-task values for TASKS).
REQUIRED: dict[str, dict[str, Any]] = {
    "fixed": {"weights": {"a": 1.0, "b": 0.5, "c": 2.0}},
    "prior_loss": {"priors": {"a": 1.0, "b": 2.0, "c": 0.25}},
}


def _same_batch_again(losses: Any) -> Any:
    """A "second batch" identical to the first (new graph nodes over the same values): MoDo's and
    SDMGrad's J1 J2' is then the Gram matrix, and every property of one batch applies."""
    if isinstance(losses, dict):
        return {t: 1.0 * v for t, v in losses.items()}
    return [1.0 * v for v in losses]


#: How to supply each per-step context key a method may declare (``context_keys``), from the
#: task names, the step index and the step's losses.
CONTEXT: dict[str, Callable[[list[str], int, Any], Any]] = {
    "kpi": lambda tasks, i, losses: {t: 0.2 + 0.15 * ((j + i) % 5) for j, t in enumerate(tasks)},
    "second_losses": lambda tasks, i, losses: _same_batch_again(losses),
}
#: property -> {method: reason}: the only methods a property does not check.
EXCEPTIONS: dict[str, dict[str, str]] = {
    "scale": {
        "torchjd": "TorchJD's UPGrad treats a Gram matrix of trace below 1e-4 as zero",
        # their weight steps are gamma * (gradient products) * lambda, as in the papers
        "moco": "the weight step gamma (Y Y' + rho I) lambda scales with the gradients (as the "
                "paper; normalize=True, the authors' code, is invariant)",
        "modo": "the weight step gamma (J1 J2' + rho I) lambda scales with the gradients (as "
                "the paper)",
    },
    # methods that combine gradients across batches or steps refuse grad_on="features" when
    # built (the representation differs between the batches): checked in check_builds
    "features": {
        "moco": "tracks parameter gradients across steps, whose features differ",
        "modo": "its two batches have different features",
        "sdmgrad": "its two batches have different features",
    },
    "degenerate": {
        # robust aggregation rules need a majority to vote; their K = 3 degenerate cases are in
        # tests/balancers/test_robust.py
        "krum": "defined for K >= n_byzantine + 3 tasks (this property also runs K = 1, 2)",
        "trimmed_mean": "defined for K > 2 trim_number tasks (this property also runs K = 1, 2)",
    },
    "citation": {
        "imtl": "ICLR 2021 with no arXiv version (cites OpenReview IMPnRXEWpvr)",
        "grad_norm_scaling": "a common baseline with no canonical paper (said in its docstring)",
        "prior_loss": "a common heuristic with no canonical paper (said in its docstring)",
        "dtp": "ECCV 2018 with no arXiv version",
        "lbtw": "AAAI 2019 student abstract with no arXiv version (cites its DOI)",
        "ew": "the plain sum, the baseline",
        "fixed": "user-given weights, the baseline of a grid search",
        "torchjd": "a wrapper: cites TorchJD's paper (arXiv:2406.16232)",
        "cr_mogm": "NeurIPS 2022 with no arXiv version",
        "imtl_l": "ICLR 2021 with no arXiv version (cites OpenReview IMPnRXEWpvr)",
        "pbi": "MOEA/D, IEEE Transactions on Evolutionary Computation 2007, no arXiv version",
    },
}
# Auto-Lambda's step needs held_out= (a function that reruns the model on a held-out batch)
# and parameters=, which these generic properties cannot build from their losses; the same
# properties are checked in tests/balancers/test_bilevel.py.
for _prop in ("degenerate", "heads", "resume", "bad_input", "own_memory"):
    EXCEPTIONS.setdefault(_prop, {})["auto_lambda"] = (
        "needs a held-out closure and the parameters (test_bilevel.py checks this property)")
for _name in ("modo", "sdmgrad"):
    EXCEPTIONS.setdefault("heads", {})[_name] = (
        "differentiates the 2K losses of its two batches, so its pass count is not K's; "
        "test_stochastic.py checks the heads (mean of both batches) and the shared update")


def exception(prop: str, name: str) -> None:
    reason = EXCEPTIONS.get(prop, {}).get(name)
    if reason:
        pytest.skip(f"{name} is an exception to {prop!r}: {reason}")


def factory(name: str) -> Factory:
    """``make(tasks=TASKS, **overrides)`` for a registered method (skips where an optional
    dependency is missing)."""

    def make(tasks: list[str] = TASKS, **overrides: Any) -> Any:
        hparams = {k: ({t: v.get(t, next(iter(v.values()))) for t in tasks}
                       if isinstance(v, dict) else v)
                   for k, v in REQUIRED.get(name, {}).items()}
        hparams.update(overrides)
        try:
            return balancers.create(name, tasks=tasks, **hparams)
        except ImportError as err:
            pytest.skip(f"{name} needs an optional dependency: {err}")

    return make


def context(b: Any, i: int = 0, losses: Any = None) -> dict[str, Any]:
    missing = [k for k in b.context_keys if k not in CONTEXT]
    assert not missing, f"no way to supply the context {missing}: add it to CONTEXT"
    return {k: CONTEXT[k](list(b.tasks), i, losses) for k in b.context_keys}


def quiet_step(b: Any, losses: Any, i: int = 0, **kw: Any) -> Any:
    """One backward (with the method's context), warnings silenced (Nash-MTL's documented
    failure warning is tested elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return b.backward(losses, **kw, **context(b, i, losses))


def run_linear(b: Any, jac: torch.Tensor, offset: float = 1.0) -> tuple[torch.Tensor, Any]:
    """One step on losses ``offset + <J_k, p>`` (gradients exactly the rows of J)."""
    p, losses = linear_losses(jac, offset)
    step = quiet_step(b, losses, shared=[p])
    if b.needs_after_step:
        b.after_step([loss.detach() for loss in losses])
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    return grad, step


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


# ------------------------------------------------------------------ the properties
def check_builds(name: str, make: Factory) -> None:
    """Builds with defaults; ``requires`` is its family's; unknown keywords are refused with the
    accepted list; a gradient method accepts every engine option."""
    b = make()
    assert str(b).startswith(name) and repr(b)
    assert type(b).missing_hook() is None
    assert b.requires in ("losses", "last_shared", "gramian", "block_gramian", "jacobian")
    accepted = balancers.hyperparameters(type(b))
    assert "check_finite" in accepted
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['nope'\]; accepted: "):
        make(nope=1)
    if isinstance(b, GradientBalancer):
        assert {"grad_on", "strategy", "chunk_size"} <= set(accepted)
        if name in EXCEPTIONS["features"]:
            with pytest.raises(ValueError, match="grad_on='parameters'"):
                make(grad_on="features")
            built = make(strategy="loop", chunk_size=2, check_finite=False)
            assert (built.strategy, built.chunk_size) == ("loop", 2)
            return
        built = make(grad_on="features", strategy="loop", chunk_size=2, check_finite=False)
        assert (built.grad_on, built.strategy, built.chunk_size) == ("features", "loop", 2)


def check_degenerate(make: Factory) -> None:
    """Degenerate inputs give finite weights and update (two steps, so state is exercised);
    where the answer is forced, that answer: zero gradients -> zero update; K identical
    gradients g -> c g with c > 0; one task -> a positive multiple of its gradient. Loss
    weightings: losses of 0, 1e-10 and 1e15 give finite weights."""
    probe = make()
    if probe.requires == "losses":
        for values in ([0.0, 0.0, 0.0], [1e-10, 1e-10, 1e-10], [1e15, 1e-10, 1.0], [2.0] * 3):
            b = make()
            for i in range(2):
                p = torch.nn.Parameter(torch.tensor(1.0))
                step = quiet_step(b, [v * p for v in values], i)
                assert torch.isfinite(step.weight_tensor).all(), (values, step.weights)
                assert math.isfinite(step.loss.item())
                if b.needs_after_step:
                    b.after_step([torch.tensor(v) for v in values])
                b.new_epoch()
        single = make(tasks=["only"])
        p = torch.nn.Parameter(torch.tensor(1.0))
        assert math.isfinite(quiet_step(single, [3.0 * p]).weights["only"])
        return
    for k in (2, 3):
        for case, jac in degenerate_jacobians(k).items():
            if k == 3 and case == "single_task":
                continue
            for offset in (1.0, 0.0):  # losses at 0 too (log-transforming methods)
                b = make(tasks=TASKS[: jac.shape[0]])
                for _ in range(2):
                    update, step = run_linear(b, jac, offset)
                    what = (case, k, offset, step.weights)
                    assert torch.isfinite(update).all(), what
                    assert torch.isfinite(step.weight_tensor).all(), what
                    g = jac[0].float()
                    if case == "zero":
                        assert (update == 0).all(), what
                    elif case in ("identical", "single_task"):
                        assert float(update.norm()) > 0, what
                        assert cos(update, g) == pytest.approx(1.0, abs=1e-5), what


def check_scale(make: Factory) -> None:
    """Every gradient multiplied by 1e-10, 1e15 or 1e20 (a float32 Gram matrix overflows): the
    update keeps its direction and the weights stay finite."""
    if make().requires == "losses":
        return
    ref, _ = run_linear(make(), scaled_base(3))
    for scale in (1e-10, 1e15, 1e20):
        update, step = run_linear(make(), scaled_base(3) * scale)
        assert torch.isfinite(step.weight_tensor).all(), (scale, step.weights)
        assert cos(update, ref) == pytest.approx(1.0, abs=1e-5), scale


def train(model: Net, b: Any, data: list, opt: torch.optim.Optimizer, start: int = 0) -> list:
    out = []
    for i, (x, y) in enumerate(data, start):
        opt.zero_grad()
        losses, z = model.losses(x, y)
        out.append(quiet_step(b, losses, i, shared=model.shared(), features=z).weights)
        opt.step()
        if b.needs_after_step:
            with torch.no_grad():
                b.after_step(model.losses(x, y)[0])
        if i % 3 == 2:
            b.new_epoch()
    return out


def check_resume(make: Factory, n: int = 6) -> None:
    """n steps, save, load into fresh objects, n more == 2n uninterrupted steps (same weights at
    every step, bit-identical parameters and state)."""
    data = batches(2 * n, 3, seed=1)
    torch.manual_seed(2)
    ref_model = Net(TASKS, scales=[1.0, 10.0, 0.1])
    model = copy.deepcopy(ref_model)
    ref_b = make()
    ref = train(ref_model, ref_b, data,
                torch.optim.SGD([*ref_model.parameters(), *ref_b.parameters()], lr=0.05))
    b = make()
    opt = torch.optim.SGD([*model.parameters(), *b.parameters()], lr=0.05)
    first = train(model, b, data[:n], opt)
    buf = io.BytesIO()
    torch.save({"b": b.state_dict(), "m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = Net(TASKS, scales=[1.0, 10.0, 0.1])
    model2.load_state_dict(saved["m"])
    b2 = make()
    b2.load_state_dict(saved["b"])
    opt2 = torch.optim.SGD([*model2.parameters(), *b2.parameters()], lr=0.05)
    opt2.load_state_dict(saved["o"])
    second = train(model2, b2, data[n:], opt2, start=n)
    assert first + second == ref
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for (key, x), (_, y) in zip(b2.state_dict().items(), ref_b.state_dict().items()):
        assert torch.equal(x, y), key


def check_state_names_the_tasks(make: Factory) -> None:
    """State saved for other tasks, or the same tasks in another order, is refused."""
    saved = make().state_dict()
    for tasks in (["a", "c", "b"], ["a", "b", "x"]):
        with pytest.raises(ValueError, match=r"saved for tasks \['a', 'b', 'c'\]"):
            make(tasks=tasks).load_state_dict(saved)
    make().load_state_dict(saved)


def check_heads_and_passes(make: Factory) -> None:
    """What the heads receive (module docstring of mtlkit.balancers._base): a loss weighting
    gives head k exactly ``w_k grad L_k`` and the trunk ``sum_k w_k grad L_k`` in one backward
    pass; a gradient method gives head k the plain gradient of its own (transformed) loss and
    runs no backward pass once the weights are known; a Gram weighting writes exactly
    ``sum_k w_k g_k`` into the shared parameters."""
    torch.manual_seed(4)
    model = Net(TASKS, scales=[1.0, 5.0, 0.2])
    x, y = batches(1, 3, seed=3)[0]
    losses, z = model.losses(x, y)
    heads = {t: list(model.heads[t].parameters()) for t in TASKS}
    own = {t: torch.autograd.grad(losses[t], heads[t], retain_graph=True) for t in TASKS}
    trunk = {t: torch.autograd.grad(losses[t], model.shared(), retain_graph=True) for t in TASKS}
    b = make()
    CountBackward.calls = 0
    step = quiet_step(b, losses, shared=model.shared(), features=z)
    w = step.weight_tensor
    if b.requires in ("losses", "last_shared"):
        assert CountBackward.calls == 1
        for k, t in enumerate(TASKS):
            for p, g in zip(heads[t], own[t]):
                torch.testing.assert_close(p.grad, w[k] * g)
        for i, p in enumerate(model.shared()):
            torch.testing.assert_close(p.grad, sum(w[k] * trunk[t][i] for k, t in enumerate(TASKS)))
        return
    strategy, chunk = auto_strategy(3, "cpu", b.chunk_size)
    if b.strategy != "auto":
        strategy = b.strategy
    expected = 1 if b.grad_on == "features" else (3 if strategy == "loop" else -(-3 // chunk))
    assert CountBackward.calls == expected
    transforms = type(b).transform_losses is not GradientBalancer.transform_losses
    for t in TASKS:
        for p, g in zip(heads[t], own[t]):
            if transforms:  # a positive multiple of the plain gradient
                assert cos(p.grad.flatten(), g.flatten()) == pytest.approx(1.0, abs=1e-5)
            else:
                torch.testing.assert_close(p.grad, g)
    if isinstance(b, GramianWeighting) and not transforms:
        for i, p in enumerate(model.shared()):
            torch.testing.assert_close(p.grad, sum(w[k] * trunk[t][i] for k, t in enumerate(TASKS)),
                                       rtol=1e-4, atol=1e-6)


def check_rejects_bad_input(make: Factory) -> None:
    """A non-finite loss raises naming the task, and changes no state; a gradient method refuses
    a parameter listed twice in ``shared``."""
    b = make()
    p = torch.nn.Parameter(torch.ones(5))
    ok = [p.sum() * (k + 1) for k in range(3)]
    quiet_step(b, ok, shared=[p])
    if b.needs_after_step:
        b.after_step([v.detach() for v in ok])
    before = copy.deepcopy(b.state_dict())
    bad = [p.sum(), p.sum() * float("nan"), p.sum()]
    with pytest.raises(FloatingPointError, match=r"task\(s\) \['b'\]"):
        quiet_step(b, bad, shared=[p])
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if b.requires != "losses":
        with pytest.raises(ValueError, match="lists a parameter twice"):
            quiet_step(b, [p.sum() * (k + 1) for k in range(3)], shared=[p, p])


def check_gradients_own_their_memory(make: Factory) -> None:
    """A leaf that receives a loss's gradient unchanged (a 0-d parameter added to a loss) may keep
    the very tensor autograd hands it as its ``.grad``; optimiser code then changes ``.grad`` in
    place (``clip_grad_norm_``, ``GradScaler.unscale_``, ``zero_grad(set_to_none=False)``). That
    must change nothing else: the step's weights and loss as read afterwards, and every later
    step, equal those of the same losses through a node that copies the gradient."""

    def run(passes_through: bool) -> list[Any]:
        torch.manual_seed(5)
        w = torch.nn.Parameter(torch.randn(4))
        s = torch.nn.Parameter(torch.tensor(0.5))  # in task b's loss only
        rows = torch.tensor([[1.0, 0.5, 0.0, 2.0], [0.0, 1.0, 3.0, 1.0], [2.0, 0.0, 1.0, 0.5]])
        b = make()
        seen = []
        for i in range(4):
            losses = [(w * r).sum() ** 2 * (10.0 ** (k - 1)) for k, r in enumerate(rows)]
            # task b's loss: s plus a data term (the add hands its gradient to s as it is)
            losses[1] = (s if passes_through else s * 1.0) + (1.0 + 0.25 * i)
            step = quiet_step(b, losses, i, shared=[w])
            s_grad = s.grad.item()
            s.grad.mul_(0.5)  # in place, as gradient clipping does
            seen.append((step.weight_tensor.tolist(), step.loss.item(), s_grad))
            if b.needs_after_step:
                b.after_step([v.detach() for v in losses])
            s.grad.zero_()  # zero_grad(set_to_none=False)
            w.grad = None
        return seen

    assert run(passes_through=True) == run(passes_through=False)


def check_citation(name: str, cls: type) -> None:
    """The docstring cites the paper with its arXiv id (exceptions say why not)."""
    assert "arXiv:" in (cls.__doc__ or ""), f"{name}: cite the paper's arXiv id"


PROPERTIES: dict[str, Callable[[Factory], None]] = {
    "degenerate": check_degenerate,
    "scale": check_scale,
    "resume": check_resume,
    "task_names": check_state_names_the_tasks,
    "heads": check_heads_and_passes,
    "bad_input": check_rejects_bad_input,
    "own_memory": check_gradients_own_their_memory,
}


# ------------------------------------------------------------------ every registered method
@pytest.mark.parametrize("name", balancers.available())
def test_builds_and_takes_the_engine_options(name):
    check_builds(name, factory(name))


@pytest.mark.parametrize("name", balancers.available())
def test_cites_its_paper(name):
    exception("citation", name)
    check_citation(name, balancers.get(name))


@pytest.mark.parametrize("prop", sorted(PROPERTIES))
@pytest.mark.parametrize("name", balancers.available())
def test_property(name, prop):
    exception(prop, name)
    PROPERTIES[prop](factory(name))


def test_exceptions_name_registered_methods_and_known_properties():
    """A stale exception (a method renamed or removed) fails here instead of hiding."""
    known = {*PROPERTIES, "citation", "features"}
    for prop, methods in EXCEPTIONS.items():
        assert prop in known, prop
        for name, reason in methods.items():
            assert name in balancers.available() and reason, (prop, name)


# ------------------------------------------------------------------ the properties can fail
def _registered(cls: type, name: str) -> Factory:
    register(name)(cls)
    return factory(name)


@pytest.fixture
def scratch_registry():
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


class _ZeroOnIdentical(GramianWeighting):
    """Mean weights, except 0 when all gradients are parallel (the bug the old contract test
    accepted)."""

    def gramian_weights(self, gramian, losses):
        g = gramian / gramian.diagonal().sum().clamp_min(1e-300)
        parallel = torch.linalg.matrix_rank(g, rtol=1e-6) <= 1
        return torch.where(parallel, 0.0, torch.full_like(g[0], 1 / g.shape[0]))


class _Float32Norms(GramianWeighting):
    """Unit gradients through a float32 square of the norms: overflows at large scales."""

    def gramian_weights(self, gramian, losses):
        sq = gramian.diagonal().float() ** 2
        return (1 / sq.sqrt().sqrt()).double()


class _Forgetful(LossWeighting):
    """Weights that depend on a step count kept outside the registered state."""

    def __init__(self, tasks, **options):
        super().__init__(tasks, **options)
        self.count = 0

    def loss_weights(self, values, context):
        self.count += 1
        return [1.0 + self.count % 4] * len(values)


class _DoubleBackward(LossWeighting):
    """Reports weights w but backpropagates 2 w."""

    def loss_weights(self, values, context):
        return torch.ones_like(values)

    def objective(self, losses, values, context):
        w = torch.ones_like(values)
        return losses @ (2 * w), w


class _SharedSeed(LossWeighting):
    """Equal weights, its backward pass seeded with the tensor the step reports (and keeps)."""

    def loss_weights(self, values, context):
        return [1.0] * len(values)

    def _balance(self, items, stacked, values, shared, features, context):
        weights = self.__dict__.setdefault("_kept", torch.ones_like(values))
        stacked.backward(weights)
        return BalanceStep(self.tasks, values @ weights, weights)


@pytest.mark.parametrize(("cls", "prop"), [
    (_SharedSeed, "own_memory"),
    (_ZeroOnIdentical, "degenerate"),
    (_Float32Norms, "degenerate"),
    (_Forgetful, "resume"),
    (_DoubleBackward, "heads"),
])
def test_a_broken_method_fails_the_property_tests(scratch_registry, cls, prop):
    make = _registered(cls, "broken_" + prop)
    assert "broken_" + prop in balancers.available()
    with pytest.raises(AssertionError):
        PROPERTIES[prop](make)
    with pytest.raises(AssertionError, match="cite the paper"):
        check_citation("broken", cls)


def test_an_incomplete_method_is_refused(scratch_registry):
    class NoHook(GramianWeighting):
        pass

    with pytest.raises(TypeError, match=r"must implement gramian_weights\(\)"):
        register("no_hook")(NoHook)
    with pytest.raises(TypeError, match="must implement"):
        NoHook(TASKS)
    with pytest.raises(TypeError, match="requires is derived|sets requires"):
        type("Declares", (GramianWeighting,), {"requires": "losses", "__module__": "x"})


def test_documented_method_passes_the_property_tests(scratch_registry):
    """docs/contract.md's complete method (under 40 lines) runs as written and, once
    registered, passes every property test above without any change to this file."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(block.strip().splitlines()) < 40
    namespace: dict[str, Any] = {"__name__": "docs_contract"}
    exec(compile(block, "docs/contract.md", "exec"), namespace)  # noqa: S102
    make = factory("gradient_similarity")
    check_builds("gradient_similarity", make)
    check_citation("gradient_similarity", namespace["GradientSimilarity"])
    for prop in PROPERTIES.values():
        prop(make)
    # its rule: aux weights max(0, cos) with the main task
    jac = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    _, step = run_linear(make(), jac)
    torch.testing.assert_close(step.weight_tensor, torch.tensor([1.0, 0.5**0.5, 0.0]))
