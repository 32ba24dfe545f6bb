"""FSDP (``torch.distributed.fsdp.fully_shard``) on 2 CPU processes (gloo): a loss weighting is
one ordinary backward pass, which FSDP reduce-scatters as usual; 2 ranks with half a batch each
equal one unsharded process with the whole batch."""

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


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.ModuleDict({
        "trunk": nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()),
        "heads": nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)})


def run(method: str, rank: int = 0, ranks: int = 1) -> dict:
    model = net()
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (ranks,))
        fully_shard(model["trunk"], mesh=mesh)
        for head in model["heads"]:
            fully_shard(head, mesh=mesh)
    b = balancers.create(method, tasks=TASKS, **({"per_batch": True} if method == "dwa" else {}))
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
        weights.append(b.backward(losses).weight_tensor.tolist())
        opt.step()
    params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
              for p in model.parameters()]
    return {"weights": weights, "params": params}


def _worker(rank: int, ranks: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        results = {m: run(m, rank, ranks) for m in METHODS}
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes: tens of seconds on 2 idle cores
def test_fsdp_two_ranks_equal_one_process(tmp_path) -> None:
    if not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "rank"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for method in METHODS:
        alone = run(method)
        torch.testing.assert_close(torch.tensor(ranks[0][method]["weights"]),
                                   torch.tensor(alone["weights"]), rtol=1e-4, atol=1e-6)
        for p, q in zip(ranks[0][method]["params"], alone["params"]):
            torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=1e-4, atol=1e-6)
