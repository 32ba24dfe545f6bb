"""FSDP (``torch.distributed.fsdp.fully_shard``) on 2 CPU processes (gloo): a loss weighting is
one ordinary backward pass, which FSDP reduce-scatters as usual; a Gram method sums the ranks'
shard Gram matrices and writes into the sharded gradients. 2 ranks with half a batch each equal
one unsharded process with the whole batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtlkit import balancers

TASKS = ["a", "b", "c"]
BATCH, STEPS = 8, 3
METHODS = ["ew", "uw", "dwa"]
# Gram methods (and a per-block Gram method), with the shared (sharded) parameters passed.
GRAM_METHODS = ["mgda", "upgrad", "gradvac", "ew"]


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.ModuleDict({
        "trunk": nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()),
        "heads": nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)})


def run(method: str, rank: int = 0, ranks: int = 1, pass_shared: bool = False) -> dict:
    model = net()
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (ranks,))
        fully_shard(model["trunk"], mesh=mesh)
        for head in model["heads"]:
            fully_shard(head, mesh=mesh)
    b = balancers.create(method, tasks=TASKS, **({"per_batch": True} if method == "dwa" else {}))
    # Taken before any forward pass: the sharded DTensors the optimiser holds.
    shared = list(model["trunk"].parameters()) if pass_shared else None
    opt = torch.optim.SGD([*model.parameters(), *b.parameters()], lr=0.1)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(STEPS, BATCH, 5, generator=g)
    ys = torch.randn(STEPS, BATCH, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2])
    part = slice(rank * BATCH // ranks, (rank + 1) * BATCH // ranks)
    weights = []
    for x, y in zip(xs[:, part], ys[:, part]):
        opt.zero_grad()
        z = model["trunk"](x)
        losses = {t: (h(z).squeeze(-1) - y[:, i]).pow(2).mean()
                  for i, (t, h) in enumerate(zip(TASKS, model["heads"]))}
        weights.append(b.backward(losses, shared=shared).weight_tensor.tolist())
        opt.step()
    params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
              for p in model.parameters()]
    return {"weights": weights, "params": params}


class Rooted(nn.Module):
    """The same network with a forward pass, for a root ``fully_shard`` around the trunk's and
    the heads' (the usual FSDP set-up: the trunk is then resharded after its forward pass and
    all-gathered again before each backward pass), and a parameter of the root used by every
    task after the heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.heads = net().values()
        self.scale = nn.Parameter(torch.tensor([1.5]))  # FSDP shards no 0-d tensor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(-1) * self.scale for h in self.heads]


def run_rooted(method: str, rank: int = 0, ranks: int = 1) -> dict:
    model = Rooted()
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (ranks,))
        for module in [model.trunk, *model.heads, model]:
            fully_shard(module, mesh=mesh)
    shared = list(model.trunk.parameters())
    b = balancers.create(method, tasks=TASKS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(STEPS, BATCH, 5, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)
    part = slice(rank * BATCH // ranks, (rank + 1) * BATCH // ranks)
    weights = []
    for x, y in zip(xs[:, part], ys[:, part]):
        opt.zero_grad()
        losses = [(o - y[:, i]).pow(2).mean() for i, o in enumerate(model(x))]
        weights.append(b.backward(losses, shared=shared).weight_tensor.tolist())
        opt.step()
    params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
              for p in model.parameters()]
    return {"weights": weights, "params": params}


def _worker(rank: int, ranks: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        results = {m: run(m, rank, ranks) for m in METHODS}
        results.update({f"{m}+shared": run(m, rank, ranks, pass_shared=True)
                        for m in GRAM_METHODS})
        results["upgrad+root"] = run_rooted("upgrad", rank, ranks)
        results["errors"] = _unsupported(rank, ranks)
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _unsupported(rank: int, ranks: int) -> list[str]:
    """The messages of what the FSDP path refuses (types and first words)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = []
    for method, options, pass_sharded in [("graddrop", {}, True),
                                          ("mgda", {"grad_on": "features"}, True),
                                          ("mgda", {}, False)]:
        model = net()
        mesh = init_device_mesh("cpu", (ranks,))
        fully_shard(model["trunk"], mesh=mesh)
        for head in model["heads"]:
            fully_shard(head, mesh=mesh)
        sharded = list(model["trunk"].parameters())
        b = balancers.create(method, tasks=TASKS, **options)
        z = model["trunk"](torch.randn(4, 5))
        losses = [h(z).pow(2).mean() for h in model["heads"]]
        # A root FSDP module's parameters() between forward and backward: unsharded copies.
        shared = sharded if pass_sharded else list(model["trunk"].parameters())
        try:
            b.backward(losses, shared=shared, features=z)
        except (NotImplementedError, ValueError) as err:
            out.append(f"{type(err).__name__}: {err}")
        else:
            out.append("no error")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Rank 0's results of every run on 2 processes (spawned once for the tests below)."""
    if not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "rank"
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(out)), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    return ranks[0]


@pytest.mark.slow  # two processes: tens of seconds on 2 idle cores
def test_fsdp_two_ranks_equal_one_process(two_ranks) -> None:
    for method in METHODS:
        alone = run(method)
        torch.testing.assert_close(torch.tensor(two_ranks[method]["weights"]),
                                   torch.tensor(alone["weights"]), rtol=1e-4, atol=1e-6)
        for p, q in zip(two_ranks[method]["params"], alone["params"]):
            torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # the same two processes as the test above
def test_fsdp_gram_methods_two_ranks_equal_one_process(two_ranks) -> None:
    """mgda and upgrad (Gram matrix summed over the shards), gradvac (per-block Gram matrices)
    and ew with shared= given, and upgrad under a root fully_shard: the parameters after 3 SGD
    steps are the one-process ones. What the FSDP path cannot do is refused by name."""
    for method in GRAM_METHODS:
        alone = run(method, pass_shared=True)
        got = two_ranks[f"{method}+shared"]
        # The steps change the weights (the test would pass vacuously with no update).
        assert got["weights"][0] != got["weights"][-1] or method == "ew"
        torch.testing.assert_close(torch.tensor(got["weights"]), torch.tensor(alone["weights"]),
                                   rtol=1e-5, atol=1e-5)
        for p, q, q0 in zip(got["params"], alone["params"], net().parameters()):
            torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=0, atol=1e-5)
            assert not torch.equal(torch.tensor(q), q0.detach().flatten())  # it moved
    alone = run_rooted("upgrad")
    for p, q in zip(two_ranks["upgrad+root"]["params"], alone["params"]):
        torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=0, atol=1e-5)
    errors = two_ranks["errors"]
    assert errors[0].startswith("NotImplementedError: GradDrop reads the whole K x P Jacobian")
    assert errors[1].startswith("NotImplementedError: grad_on='features' is not supported")
    assert errors[2].startswith("ValueError: the losses come out of FSDP (fully_shard) modules")
