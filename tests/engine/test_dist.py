"""Under torch.distributed every balancer computes what one process computes on the whole batch.

Two processes (gloo, CPU) each take half of a batch, with the model wrapped in DDP; a single
process takes the whole batch. After four SGD steps the parameters and the task weights of
every step agree to float tolerance. Loss weightings and GradNorm run a plain DDP step (DDP
averages the model's gradients); the per-task-gradient methods run the forward pass under
``model.no_sync()`` and the engine averages what it computes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtlkit import balancers
from mtlkit.engine._dist import all_mean, all_mean_list, world_size

TASKS = ["a", "b", "c"]
BATCH, STEPS = 8, 4
# name -> hyperparameters; every method whose result is deterministic given (seed, step)
METHODS: dict[str, dict] = {
    "ew": {}, "uw": {}, "dwa": {"per_batch": True}, "lbtw": {}, "dtp": {}, "geometric": {}, "initial_loss": {"num_batches": 2},
    "rlw": {}, "famo": {}, "famo/next": {"update": "next_batch"}, "gradnorm": {},
    "mgda": {}, "mgda/features": {"grad_on": "features"}, "pcgrad": {}, "graddrop": {},
    "gradvac": {}, "cagrad": {}, "imtl": {}, "imtl/loss": {"loss_scale": True},
    "nash_mtl": {}, "aligned_mtl": {}, "upgrad": {}, "upgrad/features": {"grad_on": "features"},
    "db_mtl": {},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z).squeeze(-1) for t, h in zip(TASKS, self.heads)}, z


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, BATCH, 5, generator=g)
    y = torch.randn(STEPS, BATCH, len(TASKS), generator=g) * torch.tensor([1.0, 5.0, 0.2])
    return x, y


def run(method: str, rank: int = 0, ranks: int = 1) -> dict[str, list]:
    """Train STEPS steps on this rank's part of each batch; the final parameters and weights."""
    torch.manual_seed(1)
    net = Net()
    model: nn.Module = net
    if ranks > 1:
        model = nn.parallel.DistributedDataParallel(net)
    b = balancers.create(method.split("/")[0], tasks=TASKS, **METHODS[method])
    opt = torch.optim.SGD([*net.parameters(), *b.parameters()], lr=0.1)
    xs, ys = data()
    part = slice(rank * BATCH // ranks, (rank + 1) * BATCH // ranks)
    weights = []

    kpi: dict[str, float] = {}

    def losses(x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out, z = model(x)
        errors = {t: (out[t] - y[:, i]).pow(2) for i, t in enumerate(TASKS)}
        # a per-sample mean in (0, 1], like an accuracy (DTP's KPI)
        kpi.update({t: float(torch.exp(-e.detach()).mean()) for t, e in errors.items()})
        return {t: e.mean() for t, e in errors.items()}, z

    for x, y in zip(xs[:, part], ys[:, part]):
        opt.zero_grad()
        if ranks > 1 and b.takes_task_gradients:
            with model.no_sync():
                ls, z = losses(x, y)
        else:
            ls, z = losses(x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Nash-MTL's bargaining warning
            context = {"kpi": dict(kpi)} if "kpi" in b.context_keys else {}
            step = b.backward(ls, shared=list(net.trunk.parameters()), features=z, **context)
        opt.step()
        if b.needs_after_step:
            with torch.no_grad():
                b.after_step(losses(x, y)[0])
        weights.append(step.weight_tensor.tolist())
    return {"weights": weights, "params": [p.detach().flatten().tolist() for p in net.parameters()]}


def _worker(rank: int, ranks: int, store: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        assert world_size() == ranks
        mean = all_mean(torch.tensor([float(rank)]))
        parts = all_mean_list([torch.full((2,), float(rank)), torch.ones(1, dtype=torch.float64)])
        checks = {"mean": mean.item(), "parts": [p.tolist() for p in parts]}
        # A non-finite loss on one rank only: every rank raises (no rank is left waiting in
        # the next collective call).
        p = nn.Parameter(torch.ones(()))
        try:
            balancers.create("ew", tasks=TASKS).backward(
                {t: p * (float("nan") if rank == 1 else 1.0) for t in TASKS})
            checks["raised"] = False
        except FloatingPointError:
            checks["raised"] = True
        # GradDrop reads the feature gradients themselves: not across ranks, a clear error.
        net = Net()
        preds, z = net(torch.randn(4, 5))
        try:
            balancers.create("graddrop", tasks=TASKS, grad_on="features").backward(
                {t: o.pow(2).mean() for t, o in preds.items()}, shared=net.trunk.parameters(),
                features=z)
            checks["features_jacobian"] = "no error"
        except NotImplementedError as err:
            checks["features_jacobian"] = str(err)
        results = {m: run(m, rank, ranks) for m in METHODS}
        Path(f"{out}.{rank}").write_text(json.dumps({"checks": checks, "results": results}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    where = tmp_path_factory.mktemp("ddp")
    out = where / "rank"
    mp.spawn(_worker, args=(2, str(where / "store"), str(out)), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0]["results"] == ranks[1]["results"]  # the replicas stayed identical
    return {"checks": [r["checks"] for r in ranks], "results": ranks[0]["results"]}


def test_collectives_average_over_the_ranks(two_ranks) -> None:
    for checks in two_ranks["checks"]:
        assert "use grad_on='parameters' under torch.distributed" in checks.pop(
            "features_jacobian")
        assert checks == {"mean": 0.5, "parts": [[0.5, 0.5], [1.0]], "raised": True}
    assert world_size() == 1 and all_mean(t := torch.ones(2)) is t  # alone: the identity


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_with_half_batches_equal_one_process(two_ranks, method: str) -> None:
    alone, together = run(method), two_ranks["results"][method]
    torch.testing.assert_close(torch.tensor(together["weights"]), torch.tensor(alone["weights"]),
                               rtol=1e-4, atol=1e-6)
    for p, q in zip(together["params"], alone["params"]):
        torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=1e-4, atol=1e-6)
