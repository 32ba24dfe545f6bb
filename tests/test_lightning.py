"""``mtlkit.lightning.balanced_step``: a LightningModule trains exactly as a plain loop.

Single process (fp32 and bf16-mixed) and ``strategy="ddp"`` on 2 CPU processes (gloo), each
with half of every batch, against one plain process with the whole batch: same weights, same
parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

TASKS = ["a", "b", "c"]
BATCH, STEPS = 8, 3
METHODS = {"ew": {}, "uw": {}, "famo": {}, "mgda": {}, "upgrad": {"grad_on": "features"}}

# The Lightning side, also run as a script under strategy="ddp" (Lightning starts rank 1 by
# running this file again).
LIGHTNING = '''
import json, os, sys, warnings
import torch, lightning
from torch import nn
from mtlkit import balancers
from mtlkit.lightning import balanced_step

TASKS = ["a", "b", "c"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in TASKS)

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads], z


def losses(net, x, y):
    out, z = net(x)
    return {t: (o - y[:, i]).pow(2).mean() for i, (t, o) in enumerate(zip(TASKS, out))}, z


class Module(lightning.LightningModule):
    def __init__(self, method, hparams):
        super().__init__()
        self.automatic_optimization = False
        self.net = Net()
        self.balancer = balancers.create(method, tasks=TASKS, **hparams)
        self.weights = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        ls, z = losses(self.net, x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = balanced_step(self, ls, shared=self.net.trunk.parameters(), features=z,
                                 after_step=lambda: losses(self.net, x, y)[0])
        self.weights.append(step.weight_tensor.float().tolist())

    def configure_optimizers(self):
        return torch.optim.SGD([*self.net.parameters(), *self.balancer.parameters()], lr=0.1)


class HalfOfEachBatch(torch.utils.data.Sampler):
    """Rank r of n takes the r-th contiguous part of every batch of the whole (as mtlkit's own
    trainer does under torchrun), so the ranks' parts make up one process's batches."""

    def __init__(self, n, batch):
        self.n, self.batch = n, batch

    def __iter__(self):
        import torch.distributed as dist
        ranks, rank = dist.get_world_size(), dist.get_rank()
        part = self.batch // ranks
        for start in range(0, self.n, self.batch):
            yield from range(start + rank * part, start + (rank + 1) * part)

    def __len__(self):
        return self.n // 2


def fit(method, hparams, x, y, batch, **trainer_args):
    module = Module(method, hparams)
    ddp = trainer_args.get("strategy") == "ddp"
    sampler = HalfOfEachBatch(len(x), 2 * batch) if ddp else None
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch,
                                       sampler=sampler)
    trainer = lightning.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu", use_distributed_sampler=False,
                                **trainer_args)
    trainer.fit(module, data)
    return {"weights": module.weights,
            "params": [p.detach().flatten().tolist() for p in module.net.parameters()]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    methods, out = json.loads(sys.argv[1]), sys.argv[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 8, 5, generator=g)
    y = torch.randn(3 * 8, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2])
    results = {m: fit(m.split("/")[0], h, x, y, 4, strategy="ddp", devices=2)
               for m, h in methods.items()}
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lightning") / "lightning_script.py"
    path.write_text(LIGHTNING)
    return path


def load(script: Path):
    sys.path.insert(0, str(script.parent))
    try:
        import lightning_script
    finally:
        sys.path.pop(0)
    return lightning_script


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 5, generator=g)
    y = torch.randn(STEPS * BATCH, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2])
    return x, y


def plain(ls_mod, method: str, amp: torch.dtype | None = None) -> dict:
    """The plain mtlkit loop on whole batches (as mtlkit.train.Trainer's step)."""
    from mtlkit import balancers

    net = ls_mod.Net()
    b = balancers.create(method.split("/")[0], tasks=TASKS, **METHODS[method])
    opt = torch.optim.SGD([*net.parameters(), *b.parameters()], lr=0.1)
    weights = []
    x, y = data()
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            ls, z = ls_mod.losses(net, xb, yb)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = b.backward(ls, shared=net.trunk.parameters(), features=z, scaler=scaler)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if b.needs_after_step:
            with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                b.after_step(ls_mod.losses(net, xb, yb)[0])
        weights.append(step.weight_tensor.float().tolist())
    return {"weights": weights,
            "params": [p.detach().flatten().tolist() for p in net.parameters()]}


def assert_same(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.tensor(got["weights"]), torch.tensor(want["weights"]),
                               rtol=rtol, atol=atol)
    for p, q in zip(got["params"], want["params"]):
        torch.testing.assert_close(torch.tensor(p), torch.tensor(q), rtol=rtol, atol=atol)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_module_trains_as_the_plain_loop(script, precision) -> None:
    """The same weights and parameters as the plain loop with the same precision. (On CPU,
    Lightning runs precision="16-mixed" as bf16 without a scaler: the scaler hand-off is
    tested below with a stand-in trainer.)"""
    mod = load(script)
    x, y = data()
    amp = {"bf16-mixed": torch.bfloat16}.get(precision)
    for method in ("famo", "mgda"):
        got = mod.fit(method, METHODS[method], x, y, BATCH, precision=precision, devices=1)
        assert_same(got, plain(mod, method, amp))


@pytest.mark.slow  # two Lightning processes: about a minute on 2 idle cores
def test_lightning_ddp_on_two_processes_equals_one_plain_process(script, tmp_path) -> None:
    out = tmp_path / "rank"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script), json.dumps(METHODS), str(out)], env=env,
                   check=True, cwd=tmp_path, timeout=600, capture_output=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the replicas stayed identical
    mod = load(script)
    for method in METHODS:
        assert_same(ranks[0][method], plain(mod, method))


def test_balanced_step_needs_manual_optimisation(script) -> None:
    from mtlkit.lightning import balanced_step

    module = nn.Module()
    module.automatic_optimization = True
    with pytest.raises(ValueError, match="automatic_optimization = False"):
        balanced_step(module, {}, shared=[])


def test_balanced_step_hands_lightnings_scaler_to_the_balancer(script) -> None:
    """Under 16-mixed the gradients written are Lightning's scale times the unscaled ones, for
    its precision plugin to unscale (and the weights are those of the unscaled losses)."""
    from types import SimpleNamespace

    from mtlkit import balancers
    from mtlkit.lightning import balanced_step

    mod = load(script)
    x, y = data()
    grads = {}
    for scale in (None, 1024.0):
        net = mod.Net()
        module = nn.Module()
        module.automatic_optimization = False
        module.net = net
        module.balancer = balancers.create("geometric", tasks=TASKS)
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(model=None),
                                         precision_plugin=SimpleNamespace(scaler=scaler))
        opt = SimpleNamespace(zero_grad=lambda: None, step=lambda: None)
        ls, _ = mod.losses(net, x[:BATCH], y[:BATCH])
        balanced_step(module, ls, shared=net.trunk.parameters(), optimizer=opt)
        grads[scale] = [p.grad.clone() for p in net.parameters()]
    for g, g0 in zip(grads[1024.0], grads[None]):
        torch.testing.assert_close(g, 1024.0 * g0, rtol=1e-5, atol=1e-6)
