"""The per-task gradient engine: strategies agree, heads get their own gradients, features mode
is exact where it should be, unconnected tasks give zero rows."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import Tensor, nn

from mtlkit import balancers
from mtlkit.engine import task_gradients, task_jacobian
from mtlkit.engine._grads import _task_leaves, chunk_sizes

for _module in ("_gradnorm", "_gramian", "_mgda", "_surgery"):  # register the gradient methods
    importlib.import_module(f"mtlkit.balancers.{_module}")

TASKS = ["a", "b", "c", "d", "e"]
CONFIGS = [("batched", None), ("loop", None), ("batched", 2), ("auto", None)]


class Model(nn.Module):
    def __init__(self, k: int = 5, detached: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.detached = detached
        self.heads = nn.ModuleList(nn.Linear(4 if i in detached else 6, 1) for i in range(k))

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(x)
        out = []
        for i, head in enumerate(self.heads):
            pred = head(x if i in self.detached else z).squeeze(-1)
            out.append((i + 1.0) * (pred - y[:, i]).pow(2).mean())
        return out, z


def data(k: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randn(8, k, generator=g)


def model_and_losses(detached: tuple[int, ...] = ()):
    torch.manual_seed(0)
    model = Model(detached=detached)
    losses, z = model.losses(*data())
    return model, losses, z


def reference_rows(losses: list[Tensor], params: list[Tensor]) -> list[list[Tensor]]:
    """rows[k][i]: gradient of loss k w.r.t. params[i], by plain autograd."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return rows


@pytest.mark.parametrize("use_features", [False, True])
@pytest.mark.parametrize(("strategy", "chunk"), CONFIGS)
def test_strategies_agree_with_autograd(strategy, chunk, use_features):
    model, losses, z = model_and_losses()
    shared = list(model.trunk.parameters())
    rows = reference_rows(losses, shared)
    heads = [reference_rows([losses[k]], list(h.parameters()))[0]
             for k, h in enumerate(model.heads)]
    tg = task_gradients(losses, shared, z if use_features else None, strategy=strategy,
                        chunk_size=chunk)
    for i, block in enumerate(tg.blocks):
        for k in range(len(losses)):
            torch.testing.assert_close(block[k], rows[k][i], rtol=1e-5, atol=1e-7)
    flat = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    torch.testing.assert_close(tg.gramian, (flat @ flat.T).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tg.block_gramians.sum(0), tg.gramian)
    torch.testing.assert_close(tg.jacobian_matrix(), flat, rtol=1e-5, atol=1e-7)
    # heads: exactly their own task's gradient
    for head, own in zip(model.heads, heads):
        for p, g in zip(head.parameters(), own):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-8)
    # the trunk's .grad is untouched until the weights are applied
    assert all(p.grad is None for p in shared)
    w = torch.linspace(0.5, 1.5, len(losses))
    tg.apply_weights(w)
    for i, p in enumerate(shared):
        torch.testing.assert_close(p.grad, sum(w[k] * rows[k][i] for k in range(len(losses))),
                                   rtol=1e-5, atol=1e-7)


def test_apply_accumulates_like_backward():
    model, losses, z = model_and_losses()
    shared = list(model.trunk.parameters())
    before = [torch.ones_like(p) for p in shared]
    for p, g in zip(shared, before):
        p.grad = g.clone()
    total = torch.autograd.grad(sum(losses), shared, retain_graph=True)
    tg = task_gradients(losses, shared, z)
    tg.apply_weights(torch.ones(len(losses)))
    for p, g0, g in zip(shared, before, total):
        torch.testing.assert_close(p.grad, g0 + g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_on", ["parameters", "features"])
def test_task_not_touching_shared_parameters_has_a_zero_row(grad_on):
    model, losses, z = model_and_losses(detached=(2,))
    own = torch.autograd.grad(losses[2], list(model.heads[2].parameters()), retain_graph=True)
    tg = task_gradients(losses, list(model.trunk.parameters()), z, grad_on=grad_on)
    assert (tg.gramian[2] == 0).all() and (tg.gramian[:, 2] == 0).all()
    assert all((b[2] == 0).all() for b in tg.blocks)
    assert (tg.gramian.diagonal()[[0, 1, 3, 4]] > 0).all()
    for p, g in zip(model.heads[2].parameters(), own):
        torch.testing.assert_close(p.grad, g)
    # and the balancers give it a finite weight
    for name in ("mgda", "upgrad", "imtl", "nash_mtl", "cagrad", "aligned_mtl"):
        m, ls, feats = model_and_losses(detached=(2,))
        b = balancers.create(name, tasks=TASKS, grad_on=grad_on)
        step = b.backward(ls, shared=list(m.trunk.parameters()), features=feats)
        assert torch.isfinite(step.weight_tensor).all(), name


class IdentityTrunk(nn.Module):
    """The features are the shared parameter itself (through an identity op), so the features
    mode and the parameters mode see exactly the same gradients."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(k))

    def losses(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.w.clone()
        return [(i + 1.0) * (h(z).squeeze(-1) - y[:, i]).pow(2).mean()
                for i, h in enumerate(self.heads)], z


@pytest.mark.parametrize("name", ["mgda", "upgrad", "imtl", "pcgrad", "cagrad", "aligned_mtl",
                                  "nash_mtl", "grad_norm_scaling", "gradvac", "graddrop",
                                  "db_mtl"])
def test_features_mode_equals_parameters_mode_for_an_identity_trunk(name):
    torch.manual_seed(3)
    ref = IdentityTrunk(3)
    y = torch.randn(8, 3)
    results = []
    for grad_on in ("parameters", "features"):
        model = copy.deepcopy(ref)
        b = balancers.create(name, tasks=["a", "b", "c"], grad_on=grad_on)
        losses, z = model.losses(y)
        step = b.backward(losses, shared=[model.w], features=z)
        results.append((step.weight_tensor, [p.grad.clone() for p in model.parameters()]))
    (w_p, g_p), (w_f, g_f) = results
    torch.testing.assert_close(w_f, w_p, rtol=1e-5, atol=1e-7)
    for a, b_ in zip(g_f, g_p):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-7)


def test_shared_parameter_used_after_the_features():
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3)
    head_b = nn.Linear(3, 1)
    x, y = data()

    def losses():
        z = torch.tanh(trunk(x))
        tied = z @ trunk.weight  # the shared weight again, after the features
        return [(z.sum(1) - y[:, 0]).pow(2).mean(),
                (head_b(z).squeeze(-1) + tied.sum(1) - y[:, 1]).pow(2).mean()], z

    ls, z = losses()
    shared = list(trunk.parameters())
    rows = reference_rows(ls, shared)
    tg = task_gradients(ls, shared, z)  # falls back to the unsplit pass
    for i, block in enumerate(tg.blocks):
        for k in range(2):
            torch.testing.assert_close(block[k], rows[k][i], rtol=1e-5, atol=1e-6)
    ls, z = losses()
    with pytest.raises(ValueError, match="shared parameter is used after the features"):
        task_gradients(ls, shared, z, grad_on="features")


def test_task_jacobian_has_no_side_effects_and_keeps_the_graph():
    model, losses, _ = model_and_losses()
    last = list(model.trunk[2].parameters())
    blocks = task_jacobian(losses, last, chunk_size=2)
    rows = reference_rows(losses, last)
    for i, block in enumerate(blocks):
        for k in range(len(losses)):
            torch.testing.assert_close(block[k], rows[k][i], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    sum(losses).backward()  # the graph is still there


def test_bad_inputs_are_named():
    model, losses, z = model_and_losses()
    shared = list(model.trunk.parameters())
    with pytest.raises(ValueError, match="grad_on must be one of"):
        task_gradients(losses, shared, grad_on="outputs")
    with pytest.raises(ValueError, match="grad_on='features' needs the features tensor"):
        task_gradients(losses, shared, grad_on="features")
    with pytest.raises(ValueError, match="features does not require grad"):
        task_gradients(losses, shared, z.detach())
    with pytest.raises(ValueError, match="not a shared parameter"):
        task_gradients(losses, shared, shared[0])


class NoVmap(torch.autograd.Function):
    """An operation whose backward cannot be vectorised (data-dependent control flow)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x * 2

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad * 2 if bool(grad.abs().sum() >= 0) else grad


def test_models_without_vmap_support_are_told_to_loop():
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3)
    x, y = data()
    z = NoVmap.apply(trunk(x))
    losses = [(z[:, 0] - y[:, 0]).pow(2).mean(), (z[:, 1] - y[:, 1]).pow(2).mean()]
    with pytest.raises(RuntimeError, match="use strategy='loop'"):
        task_gradients(losses, list(trunk.parameters()), strategy="batched")
    z = NoVmap.apply(trunk(x))
    losses = [(z[:, 0] - y[:, 0]).pow(2).mean(), (z[:, 1] - y[:, 1]).pow(2).mean()]
    rows = reference_rows(losses, list(trunk.parameters()))
    tg = task_gradients(losses, list(trunk.parameters()), strategy="loop")
    torch.testing.assert_close(tg.blocks[0][1], rows[1][0])


@pytest.mark.parametrize("grad_on", ["parameters", "features"])
def test_tasks_sharing_an_operation_after_the_features(grad_on):
    """A parameter-free operation after the features shared by every head (its graph must be
    kept between the per-task passes) gives the same gradients as plain autograd."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3)
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    x, y = data()

    def losses():
        z = trunk(x)
        shared_op = torch.tanh(z) * 2  # saved tensors, used by both tasks
        return [(h(shared_op).squeeze(-1) - y[:, i]).pow(2).mean()
                for i, h in enumerate(heads)], z

    ls, z = losses()
    found = _task_leaves(ls, {id(p) for p in trunk.parameters()}, z)
    bypass, overlap = found.bypass, found.overlap
    assert overlap and not bypass
    rows = reference_rows(ls, [*trunk.parameters(), *heads[1].parameters()])
    ls, z = losses()
    tg = task_gradients(ls, list(trunk.parameters()), z, grad_on=grad_on)
    if grad_on == "parameters":
        torch.testing.assert_close(tg.blocks[0][1], rows[1][0])
    torch.testing.assert_close(heads[1].weight.grad, rows[1][2])


@pytest.mark.parametrize("grad_on", ["parameters", "features"])
def test_a_parameter_behind_the_features_that_is_not_shared_is_an_error(grad_on):
    torch.manual_seed(0)
    trunk, hidden = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
    heads = [torch.nn.Linear(4, 1) for _ in range(2)]
    z = hidden(torch.relu(trunk(torch.randn(5, 3))))
    losses = [h(z).square().mean() for h in heads]
    with pytest.raises(ValueError, match=r"2 parameter\(s\) computed into the features are not"):
        task_gradients(losses, list(trunk.parameters()), z, grad_on=grad_on)
    # listing every trunk parameter is fine
    out = task_gradients(losses, [*trunk.parameters(), *hidden.parameters()], z, grad_on=grad_on)
    assert out.gramian.shape == (2, 2)


def test_chunks_are_as_few_as_greedy_ones_and_even():
    for k in range(1, 50):
        for at_most in range(1, 20):
            sizes = chunk_sizes(k, at_most)
            assert sum(sizes) == k
            assert len(sizes) == -(-k // at_most)  # as many passes as greedy chunks
            assert max(sizes) <= at_most and max(sizes) - min(sizes) <= 1
    assert chunk_sizes(40, 16) == [14, 13, 13]
    assert chunk_sizes(0, 4) == []


@pytest.mark.parametrize("grad_on", ["parameters", "features"])
def test_a_head_parameter_used_by_two_tasks_gets_both_gradients(grad_on):
    """A task-specific leaf used directly by two heads (no shared operation above z): the heads
    pass asks each loss only for its own leaves, and this one belongs to both."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3)
    heads = [nn.Linear(3, 1) for _ in range(2)]
    scale = nn.Parameter(torch.tensor(1.5))
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def losses():
        z = trunk(x)
        return [((h(z).squeeze(-1) * scale - y[:, i]) ** 2).mean()
                for i, h in enumerate(heads)], z

    ls, _ = losses()
    expected = torch.autograd.grad(sum(ls), scale)[0]
    ls, z = losses()
    task_gradients(ls, list(trunk.parameters()), z, grad_on=grad_on)
    torch.testing.assert_close(scale.grad, expected)


@pytest.mark.parametrize("use_features", [False, True])
@pytest.mark.parametrize(("strategy", "chunk"), [*CONFIGS, ("gramian", None)])
def test_retain_graph_lets_a_second_call_run_through_the_same_graph(strategy, chunk,
                                                                     use_features):
    model, losses, z = model_and_losses()
    shared = list(model.trunk.parameters())
    feats = z if use_features else None
    rows = reference_rows(losses, shared)
    flat = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows]).double()
    own = reference_rows([losses[0]], list(model.heads[0].parameters()))[0]
    first = task_gradients(losses, shared, feats, strategy=strategy, chunk_size=chunk,
                           retain_graph=True)
    first.apply_weights(torch.ones(len(losses)))  # Gram-only: a backward pass, kept too
    second = task_gradients(losses, shared, feats, strategy=strategy, chunk_size=chunk)
    for tg in (first, second):
        torch.testing.assert_close(tg.gramian, flat @ flat.T, rtol=1e-5, atol=1e-6)
    # the heads got their gradient once per call
    for p, g in zip(model.heads[0].parameters(), own):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-5, atol=1e-7)
    # without it the graph is freed, as by a plain backward()
    second.apply_weights(torch.ones(len(losses)))
    with pytest.raises(RuntimeError, match="second time"):
        task_gradients(losses, shared, feats, strategy=strategy, chunk_size=chunk)


@pytest.mark.parametrize(("strategy", "chunk", "passes"),
                         [("loop", None, 2), ("batched", 2, 1), ("batched", None, 1)])
def test_a_pass_runs_only_through_its_own_losses_graphs(strategy, chunk, passes):
    # Losses 0-1 of one forward, 2-3 of another (two batches in one call): each chunk's
    # backward pass reaches only its own losses' trunk, not the other's with zero gradients.
    torch.manual_seed(0)
    model = Model(k=4)
    shared = list(model.trunk.parameters())
    calls = [0, 0]
    losses: list[Tensor] = []
    for b in range(2):
        x, y = data(k=4, seed=b)
        z = model.trunk(x)
        z.register_hook(lambda g, b=b: calls.__setitem__(b, calls[b] + 1))
        losses += [(model.heads[2 * b + i](z).squeeze(-1) - y[:, i]).pow(2).mean()
                   for i in range(2)]
    rows = reference_rows(losses, shared)
    calls[:] = [0, 0]
    tg = task_gradients(losses, shared, strategy=strategy, chunk_size=chunk)
    # a single vectorised chunk of all four losses runs once through both trunks
    assert calls == [passes, passes]
    flat = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    torch.testing.assert_close(tg.jacobian_matrix(), flat, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("strategy", "chunk"), CONFIGS)
def test_need_gramian_false_gives_the_same_blocks_without_gram_matrices(strategy, chunk):
    model, losses, _ = model_and_losses()
    shared = list(model.trunk.parameters())
    rows = reference_rows(losses, shared)
    flat = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    tg = task_gradients(losses, shared, strategy=strategy, chunk_size=chunk, need_jacobian=True,
                        need_gramian=False)
    assert tg.gramian.shape == (0, 0) and tg.block_gramians.shape == (0, 5, 5)
    torch.testing.assert_close(tg.jacobian_matrix(), flat, rtol=1e-5, atol=1e-7)
    w = torch.linspace(0.5, 1.5, len(losses))
    tg.apply_weights(w)
    update = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(update, w @ flat, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="need_jacobian"):
        task_gradients(losses, shared, need_gramian=False)
