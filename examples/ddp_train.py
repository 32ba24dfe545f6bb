"""Multi-task training with a balancer: one script for one process and for ``torchrun`` (DDP).

    python examples/ddp_train.py --method upgrad
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --method upgrad

Each step takes a batch of ``--batch`` samples; under torchrun every rank trains on its own
slice of it (a DistributedSampler would do the same with a dataset). The balancer averages
what it reads over the ranks, so both commands print the same task weights and final loss (to
float tolerance; ``tests/test_examples.py`` checks it). The only DDP-specific line is the
``no_sync()`` around the forward pass of a balancer that takes per-task gradients itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from mtlkit import balancers

TASKS = ("small", "medium", "large")
SCALES = torch.tensor([0.1, 1.0, 10.0])  # target scales: a plain sum lets "large" dominate


class Net(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}, z


def batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches in every process: random inputs, targets from a fixed linear map."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, len(TASKS), generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(size, 8, generator=g)
        out.append((x, torch.tanh(x @ w) * SCALES))
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="upgrad", help="balancer name (mtlkit list)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    args = parser.parse_args(argv)

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ranks > 1 else 0
    if args.batch % ranks:
        parser.error(f"--batch {args.batch} must split evenly over {ranks} processes")

    torch.manual_seed(0)  # the same initial model on every rank
    net = Net()
    model = nn.parallel.DistributedDataParallel(net) if ranks > 1 else net
    balancer = balancers.create(args.method, tasks=list(TASKS))
    optimizer = torch.optim.Adam([*net.parameters(), *balancer.parameters()], lr=1e-2)
    mine = slice(rank * args.batch // ranks, (rank + 1) * args.batch // ranks)

    def task_losses(x: torch.Tensor, y: torch.Tensor):
        out, z = model(x)
        return {t: (out[t] - y[:, i]).pow(2).mean() for i, t in enumerate(TASKS)}, z

    step = None
    for x, y in batches(args.steps, args.batch):
        x, y = x[mine], y[mine]
        optimizer.zero_grad()
        no_sync = ranks > 1 and balancer.takes_task_gradients
        with model.no_sync() if no_sync else contextlib.nullcontext():
            losses, z = task_losses(x, y)
        step = balancer.backward(losses, shared=net.trunk.parameters(), features=z)
        optimizer.step()
        if balancer.needs_after_step:
            with torch.no_grad():
                balancer.after_step(task_losses(x, y)[0])
    assert step is not None
    result = {"method": args.method, "processes": ranks, "weights": step.weights,
              "loss": step.loss.item()}
    if rank == 0:
        print(json.dumps(result))
    if ranks > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
