"""Time the K x K solvers of upgrad, cagrad and mgda against TorchJD's weightings, on the Gram
matrices of the speed benchmark's problems (K=3 and K=40): ``python bench/solvers.py``.

Process CPU time per call, best of 7 measurements of at least 0.2 s each, one torch thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import mtlkit.balancers._gramian as gramian_mod
from mtlkit.balancers._gramian import CAGrad, UPGrad
from mtlkit.balancers._mgda import MGDA
from mtlkit.benchmarks import speed
from mtlkit.benchmarks._models import suites


def gramians() -> dict[int, torch.Tensor]:
    """The Gram matrix of one step of each suite (the benchmark's learning rate is 0, so every
    step has the same one)."""
    out: dict[int, torch.Tensor] = {}
    original = gramian_mod.to_host

    def capture(g: torch.Tensor) -> torch.Tensor:
        out.setdefault(g.shape[0], g.detach().clone())
        return original(g)

    gramian_mod.to_host = capture
    try:
        for name in ("dense", "many"):
            problem = speed.Problem(suites(False)[name], torch.device("cpu"))
            problem.step_fn(speed.Spec("upgrad"))()
    finally:
        gramian_mod.to_host = original
    return out


def best_ms(fn: Callable[[], object]) -> float:
    fn()
    best = float("inf")
    for _ in range(7):
        start, n = time.process_time(), 0
        while time.process_time() - start < 0.2:
            fn()
            n += 1
        best = min(best, (time.process_time() - start) / n * 1e3)
    return best


def main() -> None:
    from torchjd.aggregation import CAGradWeighting, MGDAWeighting, UPGradWeighting

    torch.set_num_threads(1)
    for k, g in sorted(gramians().items()):
        tasks = [f"t{i}" for i in range(k)]
        losses = torch.zeros(k)
        pairs = {
            "upgrad": (UPGrad(tasks), UPGradWeighting()),
            "cagrad": (CAGrad(tasks, rescale=0), CAGradWeighting(c=0.4)),
            "mgda": (MGDA(tasks), MGDAWeighting()),
        }
        for name, (ours, peer) in pairs.items():
            t_ours = best_ms(lambda: ours.gramian_weights(g, losses))  # noqa: B023
            t_peer = best_ms(lambda: peer(g))  # noqa: B023
            print(f"K={k:2d} {name:7s} ours {t_ours:7.3f} ms  torchjd {t_peer:7.3f} ms")


if __name__ == "__main__":
    main()
