"""The MultiTaskModel contract, checked on every architecture of ``tiny_models()``: outputs,
the parameter partition and its gradient flow, the features cut, training through balancers,
per-task learning rates."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from _models import Entry, tiny_models

import mtlkit.balancers
from mtlkit.engine import task_gradients
from mtlkit.nn import MultiTaskModel
from mtlkit.optim import per_task_param_groups

NAMES = sorted(tiny_models())


@functools.lru_cache(maxsize=1)
def _cached() -> dict[str, Entry]:
    return tiny_models()


def _entry(name: str) -> Entry:
    """A fresh copy of the cached tiny model (tests may train or cast it)."""
    model, x, losses = _cached()[name]
    return copy.deepcopy(model), x.clone(), losses


def _ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_outputs_have_task_names_and_shapes(name: str, dtype: torch.dtype) -> None:
    model, x, losses = _entry(name)
    model.eval()
    ref = model(x)
    model.to(dtype)
    out = model(x.to(dtype))
    assert isinstance(model, MultiTaskModel)
    assert list(out) == list(model.tasks) == list(losses)
    for t in model.tasks:
        assert out[t].shape == ref[t].shape, t
        assert out[t].dtype == dtype, t
        assert torch.isfinite(out[t].float()).all(), t
    if model.features is not None:
        assert model.features.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_shared_and_task_parameters_partition_all_parameters(name: str) -> None:
    model, _, _ = _entry(name)
    every = _ids(model.parameters())
    shared = _ids(model.shared_parameters())
    per_task = {t: _ids(model.task_parameters(t)) for t in model.tasks}
    pieces = shared + [i for ids in per_task.values() for i in ids]
    assert sorted(pieces) == sorted(every)  # a partition: no overlap, nothing missing
    assert len(set(pieces)) == len(pieces)
    assert shared, "every architecture shares something"
    # Without detach, the upstream task's head also serves the downstream task: it is shared.
    empty = {"cascade_no_detach": {"a"}}.get(name, set())
    assert {t for t, ids in per_task.items() if not ids} == empty


@pytest.mark.parametrize("name", NAMES)
def test_unknown_task_is_a_value_error_naming_it(name: str) -> None:
    model, _, _ = _entry(name)
    with pytest.raises(ValueError, match="'nope'"):
        model.task_parameters("nope")


#: Architectures documenting ``features = None`` (no single tensor carries all shared work).
FEATURES_NONE = {"mtan", "segnet_mtan"}
#: Architectures where some shared parameters serve a subset of the tasks (at least two).
SUBSET_SHARING = {"cascade_no_detach", "fafs_widened"}


def _eval_with_batch_statistics(model: MultiTaskModel, x: torch.Tensor) -> None:
    """Eval mode with BatchNorm running statistics set to those of ``x``.

    In training mode a bias right before BatchNorm has an exactly-zero gradient (BN removes
    the mean), which says nothing about sharing; with fresh running statistics (mean 0, var 1)
    eval-mode BN does not centre, and ReLUs over non-negative inputs can all be dead.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


@pytest.mark.parametrize("name", NAMES)
def test_each_task_loss_reaches_all_shared_and_only_its_own_parameters(name: str) -> None:
    model, x, losses = _entry(name)
    _eval_with_batch_statistics(model, x)
    out = model(x)
    shared = list(model.shared_parameters())
    owned = {t: list(model.task_parameters(t)) for t in model.tasks}
    params = shared + [p for u in model.tasks for p in owned[u]]
    users = {id(p): 0 for p in shared}
    aux = {id(p) for p in getattr(model, "auxiliary_parameters", list)()}
    for t in model.tasks:
        grads = torch.autograd.grad(losses[t](out[t]), params, allow_unused=True, retain_graph=True)
        g = dict(zip(_ids(params), grads))
        for p in shared:
            users[id(p)] += _nonzero(g[id(p)])
            if name not in SUBSET_SHARING:
                assert _nonzero(g[id(p)]), (t, tuple(p.shape))
        for p in owned[t]:
            if id(p) not in aux:  # reached by the task's deep-supervision loss only
                assert _nonzero(g[id(p)]), (t, tuple(p.shape))
        for u in model.tasks:
            if u != t:
                for p in owned[u]:
                    assert not _nonzero(g[id(p)]), (t, u, tuple(p.shape))
    # "Shared" means used by more than one task, for every shared parameter.
    assert min(users.values()) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_features_carry_the_whole_shared_gradient(name: str) -> None:
    """Backpropagating dL/dfeatures through the trunk gives exactly dL/dshared: the tensor
    that balancers use with ``grad_on="features"`` separates shared from task parameters."""
    model, x, losses = _entry(name)
    _eval_with_batch_statistics(model, x)
    out = model(x)
    feats = model.features
    assert (feats is None) == (name in FEATURES_NONE)
    if feats is None:
        with pytest.raises(ValueError, match="no single shared representation.*grad_on='param"):
            model.require_features()
        return
    assert model.require_features() is feats
    # Nothing task-specific lies behind the features (else features mode would never train it).
    owned = [p for t in model.tasks for p in model.task_parameters(t)]
    behind = torch.autograd.grad(
        feats, owned, torch.randn_like(feats), retain_graph=True, allow_unused=True
    )
    assert not any(_nonzero(g) for g in behind)
    shared = list(model.shared_parameters())
    for t in model.tasks:
        loss = losses[t](out[t])
        direct = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        (g_feat,) = torch.autograd.grad(loss, feats, retain_graph=True)
        assert g_feat.abs().sum() > 0, t
        via = torch.autograd.grad(feats, shared, g_feat, retain_graph=True, allow_unused=True)
        for p, a, b in zip(shared, direct, via):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_of_summed_loss_decrease_it(name: str) -> None:
    model, x, losses = _entry(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def total() -> torch.Tensor:
        out = model(x)
        return sum(fn(out[t]) for t, fn in losses.items())

    model.train()  # BatchNorm uses batch statistics throughout, dropout is off in tiny models
    before = None
    for _ in range(15):
        opt.zero_grad()
        loss = total()
        before = loss.item() if before is None else before
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = total().item()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("name", ["hard_sharing", "mmoe", "dselect_k", "cross_stitch"])
def test_copy_and_pickle_after_a_forward(name: str) -> None:
    model, x, _ = _entry(name)
    out = model(x)
    clone = copy.deepcopy(model)
    assert clone.features is None and model.features is not None
    again = pickle.loads(pickle.dumps(model))
    model.eval(), clone.eval(), again.eval()
    for t, y in model(x).items():
        torch.testing.assert_close(clone(x)[t], y)
        torch.testing.assert_close(again(x)[t], y)
    assert set(out) == set(model.tasks)


def test_require_features_before_any_forward_says_so() -> None:
    model, _, _ = _entry("hard_sharing")
    with pytest.raises(ValueError, match="run a forward pass first"):
        model.require_features()


@pytest.mark.parametrize("name", sorted(set(NAMES) - FEATURES_NONE))
def test_passing_features_in_parameters_mode_changes_no_gradient(name: str) -> None:
    """The engine splits the backward at ``features`` when given them; the split must give the
    same task Gram matrix and the same gradient of every parameter as the unsplit pass."""
    results = []
    for give in (False, True):
        model, x, losses = _entry(name)
        _eval_with_batch_statistics(model, x)
        out = model(x)
        grads = task_gradients(
            [losses[t](out[t]) for t in model.tasks],
            list(model.shared_parameters()),
            model.features if give else None,
            strategy="loop",
        )
        grads.apply_weights(torch.ones(len(model.tasks)))
        results.append((grads.gramian, [p.grad for p in model.parameters()]))
    (gram_a, grads_a), (gram_b, grads_b) = results
    torch.testing.assert_close(gram_b, gram_a, rtol=1e-4, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


#: One balancer of each kind: (registry name, constructor arguments).
BALANCERS = {
    "uw": ("uw", {}),  # loss weighting with learned log-variances (balancer parameters)
    "mgda-parameters": ("mgda", {"grad_on": "parameters"}),
    "upgrad-features": ("upgrad", {"grad_on": "features"}),
}
STEPS = 8


@pytest.mark.parametrize("balancer_id", sorted(BALANCERS))
@pytest.mark.parametrize("name", NAMES)
def test_each_architecture_trains_with_loss_and_gradient_balancers(
    name: str, balancer_id: str
) -> None:
    """A few Adam steps through ``balancer.backward`` on one fixed random batch lower the sum
    of the raw task losses, for a loss balancer and for gradient balancers at the parameters
    and at the features. Architectures with no single shared representation refuse features
    mode with a clear error, before anything is written."""
    model, x, losses = _entry(name)
    key, kwargs = BALANCERS[balancer_id]
    balancer = mtlkit.balancers.create(key, tasks=list(model.tasks), **kwargs)
    opt = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-2)
    features_mode = kwargs.get("grad_on") == "features"
    model.train()  # BatchNorm uses batch statistics throughout; the tiny models have no dropout

    def task_losses() -> dict[str, torch.Tensor]:
        out = model(x)
        return {t: fn(out[t]) for t, fn in losses.items()}

    if features_mode and name in FEATURES_NONE:
        step_losses = task_losses()
        with pytest.raises(ValueError, match="no single shared representation"):
            model.require_features()
        with pytest.raises(ValueError, match="features"):
            balancer.backward(
                step_losses, shared=model.shared_parameters(), features=model.features
            )
        assert all(p.grad is None for p in model.parameters())
        assert int(balancer.step) == 0
        return

    with torch.no_grad():
        before = sum(task_losses().values()).item()
    initial = [p.detach().clone() for p in balancer.parameters()]
    for _ in range(STEPS):
        opt.zero_grad()
        step_losses = task_losses()
        features = model.require_features() if features_mode else model.features
        step = balancer.backward(step_losses, shared=model.shared_parameters(), features=features)
        assert torch.isfinite(step.weight_tensor).all()
        opt.step()
    with torch.no_grad():
        after = sum(task_losses().values()).item()
    assert after < 0.9 * before, (before, after)
    assert int(balancer.step) == STEPS
    for p, p0 in zip(balancer.parameters(), initial):  # the balancer's own parameters learn
        assert not torch.equal(p.detach(), p0)


@pytest.mark.parametrize("name", NAMES)
def test_per_task_learning_rates_cover_every_parameter_once(name: str) -> None:
    model, x, losses = _entry(name)
    first = model.tasks[0]
    groups = per_task_param_groups(
        model.shared_parameters(),
        {t: model.task_parameters(t) for t in model.tasks},
        lr=1e-2,
        shared_lr=1e-3,
        task_lr={first: 1e-1},
    )
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(_ids(model.parameters())) and len(set(ids)) == len(ids)
    with_params = [t for t in model.tasks if list(model.task_parameters(t))]
    assert [g["name"] for g in groups] == ["shared", *with_params]
    # One plain SGD step moves every parameter by its own group's learning rate.
    opt = torch.optim.SGD(groups)
    model.train()
    out = model(x)
    sum(fn(out[t]) for t, fn in losses.items()).backward()
    old = {id(p): p.detach().clone() for p in model.parameters()}
    opt.step()
    expected_lr = {"shared": 1e-3, first: 1e-1}
    for g in groups:
        assert g["lr"] == expected_lr.get(g["name"], 1e-2)
        for p in g["params"]:
            if p.grad is not None:
                torch.testing.assert_close(p.detach(), old[id(p)] - g["lr"] * p.grad)
