"""The Gram-only path (``strategy="gramian"``) gives the Jacobian path's update without holding
the K x P Jacobian."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from mtlkit import balancers
from mtlkit.engine import _grads, task_gradients

K = 6
# (MoDo and SDMGrad read both batches' task gradients themselves: never Gram-only)
GRAMIAN_METHODS = [n for n in balancers.available()
                   if n != "torchjd" and balancers.get(n).requires == "gramian"
                   and not getattr(balancers.get(n), "needs_second_batch", False)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        # a parameter used twice (its gradient sums two paths before the hook sees it)
        self.trunk = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(K))

    def losses(self, x: torch.Tensor, y: torch.Tensor):
        z = self.trunk(x)
        z = z + 0.5 * self.trunk[2](z)
        return [(i + 1.0) * (h(z).squeeze(-1) - y[:, i]).pow(2).mean()
                for i, h in enumerate(self.heads)], z


def data(step: int = 0):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, generator=g), torch.randn(8, K, generator=g)


@pytest.mark.parametrize("use_features", [False, True])
def test_gram_only_gramian_and_update_equal_the_jacobian_path(use_features) -> None:
    net = Net()
    ref = copy.deepcopy(net)
    w = torch.linspace(0.5, 2.0, K)
    out = {}
    for m, strategy in ((ref, "batched"), (net, "gramian")):
        losses, z = m.losses(*data())
        tg = task_gradients(losses, list(m.trunk.parameters()), z if use_features else None,
                            strategy=strategy)
        assert (tg.blocks == []) == (strategy == "gramian")
        tg.apply_weights(w)
        out[strategy] = tg
    torch.testing.assert_close(out["gramian"].gramian, out["batched"].gramian,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["gramian"].block_gramians, out["batched"].block_gramians,
                               rtol=1e-5, atol=1e-6)
    for p, q in zip(net.parameters(), ref.parameters()):  # trunk: sum w_k g_k; heads: own
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="holds no per-task gradients"):
        out["gramian"].jacobian_matrix()


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_auto_takes_the_gram_only_path_over_the_budget(monkeypatch, name) -> None:
    """Every Gram method: three SGD steps over the budget equal three on the Jacobian path."""
    results = []
    real = _grads._gram_pass
    for budget in (2**62, 0):
        monkeypatch.setattr(_grads, "JACOBIAN_BUDGET", budget)
        calls: list[int] = []
        monkeypatch.setattr(_grads, "_gram_pass",
                            lambda *a, calls=calls: calls.append(1) or real(*a))
        net = Net()
        b = balancers.create(name, tasks=[str(i) for i in range(K)])
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        weights = []
        for step in range(3):
            opt.zero_grad()
            losses, z = net.losses(*data(step))
            context = ({"second_losses": net.losses(*data(100 + step))[0]}
                       if "second_losses" in b.context_keys else {})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                weights.append(b.backward(losses, shared=net.trunk.parameters(),
                                          features=z, **context).weight_tensor)
            opt.step()
        assert len(calls) == (3 if budget == 0 else 0)
        results.append((torch.stack(weights), [p.detach() for p in net.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    for p, q in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_gram_only_refuses_what_it_cannot_serve(monkeypatch) -> None:
    monkeypatch.setattr(_grads, "JACOBIAN_BUDGET", 0)
    for name in ("graddrop", "gradvac", "modo"):  # they read the gradients: Jacobian path
        net = Net()
        losses, z = net.losses(*data())
        b = balancers.create(name, tasks=[str(i) for i in range(K)])
        context = ({"second_losses": net.losses(*data(1))[0]}
                   if "second_losses" in b.context_keys else {})
        b.backward(losses, shared=net.trunk.parameters(), **context)
    net = Net()
    losses, z = net.losses(*data())
    with pytest.raises(ValueError, match="need only the Gram matrix"):
        task_gradients(losses, list(net.trunk.parameters()), z, strategy="gramian",
                       need_jacobian=True)
    with pytest.raises(ValueError, match="need only the Gram matrix"):
        task_gradients(losses, list(net.trunk.parameters()), z, strategy="gramian",
                       grad_on="features")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_block_gram_is_exact_in_slices_of_a_strided_block(monkeypatch, dtype) -> None:
    # A (K, out, in, kh, kw) block laid out as a vectorised backward hands it over (the task
    # dimension not first in memory), with magnitudes that overflow a float32 product.
    g = torch.Generator().manual_seed(0)
    inner = torch.randn(5, K, 3, 2, 2, generator=g, dtype=torch.float64) * 1e20
    block = inner.movedim(1, 0).to(dtype)
    assert not block.is_contiguous()
    flat = block.double().reshape(K, -1)
    want = flat @ flat.T
    for chunk in (1, 7, 1 << 22):  # one element a slice, a few slices, the whole block
        monkeypatch.setattr(_grads, "GRAM_CHUNK", chunk)
        got = _grads._gram(block)
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2,
                                   atol=0)
    assert torch.equal(_grads._gram(torch.zeros(K, 4)), torch.zeros(K, K, dtype=torch.float64))


def test_block_gram_makes_no_temporary_as_large_as_the_block(monkeypatch) -> None:
    # 40 tasks x 2**20 parameters (160 MB): with slices of 2**16 elements, every allocation
    # _gram makes is a small fraction of the block (the earlier version copied and scaled the
    # whole block: two 160 MB temporaries).
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(_grads, "GRAM_CHUNK", 1 << 16)
    inner = torch.randn(1024, 40, 1024)
    block = inner.movedim(1, 0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _grads._gram(block)
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < largest <= 4 * (1 << 16) * 2, largest


class WideNet(nn.Module):
    """Layers whose task gradients outweigh their per-layer Gram form: wide convolutions on
    small maps (stride, padding, dilation, with and without bias), a linear layer with bias
    and one without, then a small convolution on the input (its input needs no gradient)."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(2, 24, 3, padding=1)
        self.wide = nn.Conv2d(24, 64, 3, stride=2, padding=2, dilation=2, bias=False)
        self.wider = nn.Conv2d(64, 48, 2)
        self.fc = nn.Linear(48, 64)
        self.mm = nn.Linear(64, 64, bias=False)
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(tasks))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.wider(torch.relu(self.wide(torch.relu(self.stem(x))))))
        z = torch.tanh(self.fc(z.mean((2, 3))))
        return torch.tanh(self.mm(z) if self.training else z @ self.mm.weight.T)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        z = self.trunk(x)
        return [(1.0 + i) * 10.0 ** (i % 5 - 2) * (h(z).squeeze(-1) - y[:, i]).pow(2).mean()
                for i, h in enumerate(self.heads)], z


@pytest.mark.parametrize("use_features", [False, True])
@pytest.mark.parametrize("training", [True, False])  # linear as addmm/mm, and as x @ W.T
def test_per_layer_gram_equals_the_jacobian_path(training, use_features) -> None:
    tasks = 12
    net = WideNet(tasks).train(training)
    shared = [p for n, p in net.named_parameters() if not n.startswith("heads")]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 2, 9, 9, generator=g), torch.randn(2, tasks, generator=g)
    losses, _ = net.losses(x, y)
    plan = _grads._layer_gram_plan(torch.stack(losses), shared, tasks)
    names = [n for n, p in net.named_parameters() if not n.startswith("heads")]
    # the wide layers go per layer; the stem (input without gradient) and biases do not
    assert sorted(names[i] for i in plan) == ["fc.weight", "mm.weight", "wide.weight",
                                              "wider.weight"]
    ref = copy.deepcopy(net)
    w = torch.linspace(0.5, 2.0, tasks)
    out = {}
    for m, strategy in ((ref, "batched"), (net, "gramian")):
        losses, z = m.losses(x, y)
        tg = task_gradients(losses, [p for n, p in m.named_parameters()
                                     if not n.startswith("heads")],
                            z if use_features else None, strategy=strategy)
        tg.apply_weights(w)
        out[strategy] = tg
    # per-task scales 1e-2 .. 1e2: compare relative to each entry's scale
    scale = out["batched"].block_gramians.abs().amax((1, 2), keepdim=True)
    torch.testing.assert_close(out["gramian"].block_gramians / scale,
                               out["batched"].block_gramians / scale, rtol=0, atol=1e-5)
    for p, q in zip(net.parameters(), ref.parameters()):  # float32 sums in another order
        top = q.grad.abs().max()
        torch.testing.assert_close(p.grad / top, q.grad / top, rtol=0, atol=1e-5)


def test_per_layer_gram_falls_back_when_a_layer_node_does_not_run(monkeypatch) -> None:
    # A linear layer whose input needs no gradient and whose node is therefore skipped: the
    # plan is forced to include it, the pass notices the hook never fired and redoes the
    # parameter-hook pass, with the same result.
    net = nn.Linear(6, 50)
    x = torch.randn(4, 6)
    out = net(x)
    losses = torch.stack([out[:, i].pow(2).mean() for i in range(5)])
    rows = torch.eye(5)
    want, _ = _grads._gram_pass(losses, [net.weight, net.bias], rows, 2, per_layer=False)
    node = out.grad_fn
    monkeypatch.setattr(_grads, "_layer_gram_plan",
                        lambda outputs, shared, k: {0: _grads._Layer(node, "linear")})
    got, _ = _grads._gram_pass(losses, [net.weight, net.bias], rows, 2)
    torch.testing.assert_close(got, want)


def test_per_layer_gram_on_a_resnet18_trunk_equals_the_jacobian_path() -> None:
    # The real case the per-layer fold is for: batch norm, residual additions, strided and
    # 1x1 downsampling convolutions; most of the 60 tensors stay on parameter hooks.
    from mtlkit.nn import resnet18

    tasks = 6
    torch.manual_seed(0)
    trunk = resnet18()
    heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(tasks))
    x = torch.randn(2, 3, 32, 32)
    y = (torch.rand(2, tasks) > 0.5).float()

    def losses(t, h):
        z = t(x)
        z = z.mean((2, 3)) if z.dim() == 4 else z
        return [10.0 ** (i % 5 - 2) * nn.functional.binary_cross_entropy_with_logits(
            head(z).squeeze(-1), y[:, i]) for i, head in enumerate(h)]

    out = {}
    for strategy in ("gramian", "batched"):
        t, h = copy.deepcopy(trunk), copy.deepcopy(heads)
        ls = losses(t, h)
        if strategy == "gramian":
            assert len(_grads._layer_gram_plan(torch.stack(ls), list(t.parameters()), tasks)) > 5
        tg = task_gradients(ls, list(t.parameters()), strategy=strategy)
        tg.apply_weights(torch.linspace(0.5, 2.0, tasks))
        out[strategy] = (tg.gramian, [p.grad for p in t.parameters()])
    top = out["batched"][0].abs().max()
    # float32 products over 11M parameters, summed in another order: 1e-5 of the largest entry
    torch.testing.assert_close(out["gramian"][0] / top, out["batched"][0] / top, rtol=0, atol=1e-5)
    for a, b in zip(out["gramian"][1], out["batched"][1]):
        scale = b.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-5)
