"""Speed benchmark: step time and peak memory of each balancer, relative to a plain sum.

Two problems (built in plain torch, :mod:`mtlkit.benchmarks._models`):

* ``dense``: a small ResNet-style encoder with three dense convolutional heads (segmentation,
  depth, normals), K = 3;
* ``many``: the same encoder, pooled, with 40 linear binary classifiers, K = 40.

A step is: zero the gradients, forward, ``balancer.backward(losses, shared=encoder parameters,
features=encoder output)``, an SGD step (learning rate 0, so every step sees the same inputs),
and ``after_step`` for the methods that need it. The reference is the plain sum:
``sum(losses).backward()`` with the same forward and optimiser step.

**Time.** Every method runs ``--steps`` steps per repeat, and the plain sum runs before and after
each method within the same repeat; the method's ratio in a repeat is its mean step time over the
mean of those two plain-sum measurements. The table shows the median ratio over ``--repeats``
repeats, all in one process (absolute times are printed for information only).

**Memory.** Peak bytes allocated by torch during one step above what is allocated before it
(parameters, optimiser state, the batch; gradients released): on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU, where
``tracemalloc`` does not see torch's allocations and the resident set size mostly measures
allocator caching, the running maximum of ``torch.profiler``'s memory events (each allocation
and release of torch's CPU allocator). Both count exactly what torch allocates, the same way for
every method and for the peers.

**Peers** (``--peers``): for methods TorchJD implements, a step with
``torchjd.autojac.mtl_backward(losses, features=...)`` followed by ``jac_to_grad(shared,
aggregator)`` with the matching aggregator, on the same model, batch and process, with
TorchJD's defaults; the table prints its ratios beside ours.

Usage::

    mtlkit bench speed [--quick] [--device cuda] [--methods mgda,upgrad] [--peers]
    python bench/speed.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtlkit import balancers
from mtlkit.benchmarks._models import Suite, build, suites

for _module in ("_gradnorm", "_gramian", "_mgda", "_surgery"):  # register the gradient methods
    importlib.import_module(f"mtlkit.balancers.{_module}")

PLAIN_SUM = "sum"
DEFAULT_METHODS = (
    "ew", "uw", "dwa", "famo", "gradnorm", "grad_norm_scaling@features",
    "mgda", "mgda@features", "pcgrad", "graddrop", "gradvac", "cagrad", "imtl", "nash_mtl",
    "aligned_mtl", "upgrad", "upgrad@features", "db_mtl",
)

# Our registry name -> TorchJD aggregator with the same definition (see tests/balancers/
# test_grad_torchjd.py for the conventions that differ).
PEERS: dict[str, Callable[[int], Any]] = {
    "mgda": lambda k: _tjd().MGDA(),
    "pcgrad": lambda k: _tjd().PCGrad(),
    "graddrop": lambda k: _tjd().GradDrop(),
    "gradvac": lambda k: _tjd().GradVac(),
    "cagrad": lambda k: _tjd().CAGrad(c=0.4),
    "imtl": lambda k: _tjd().IMTLG(),
    "nash_mtl": lambda k: _tjd().NashMTL(n_tasks=k),
    "aligned_mtl": lambda k: _tjd().AlignedMTL(),
    "upgrad": lambda k: _tjd().UPGrad(),
}


def _tjd() -> Any:
    from torchjd import aggregation

    return aggregation


@dataclass(frozen=True)
class Spec:
    """A method as written on the command line: ``name`` or ``name@features``; the plain sum is
    ``sum``; ``torchjd:name`` is the peer of ``name``."""

    key: str

    @property
    def peer(self) -> bool:
        return self.key.startswith("torchjd:")

    @property
    def name(self) -> str:
        return self.key.removeprefix("torchjd:").split("@")[0]

    @property
    def grad_on(self) -> str | None:
        return "features" if self.key.endswith("@features") else None


class Problem:
    """A model, its batch and the step functions of the methods, on one device."""

    def __init__(self, suite: Suite, device: torch.device) -> None:
        torch.manual_seed(0)
        self.suite = suite
        self.device = device
        self.model = build(suite).to(device)
        self.batch = self.model.make_batch(suite, device)
        self.shared = list(self.model.encoder.parameters())

    def step_fn(self, spec: Spec) -> Callable[[], None]:
        model, batch, shared = self.model, self.batch, self.shared
        if spec.key == PLAIN_SUM:
            opt = torch.optim.SGD(model.parameters(), lr=0.0)

            def plain() -> None:
                opt.zero_grad(set_to_none=True)
                losses, _ = model.losses(*batch)
                sum(losses.values()).backward()
                opt.step()

            return plain
        if spec.peer:
            from torchjd.autojac import jac_to_grad, mtl_backward

            aggregator = PEERS[spec.name](len(self.suite.tasks))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)

            def peer() -> None:
                opt.zero_grad(set_to_none=True)
                losses, z = model.losses(*batch)
                mtl_backward(list(losses.values()), features=z)
                jac_to_grad(shared, aggregator)
                opt.step()

            return peer
        hparams = {"grad_on": spec.grad_on} if spec.grad_on else {}
        balancer = balancers.create(spec.name, tasks=list(self.suite.tasks), **hparams)
        balancer.to(self.device)
        opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.0)

        def ours() -> None:
            opt.zero_grad(set_to_none=True)
            losses, z = model.losses(*batch)
            balancer.backward(losses, shared=shared, features=z)
            opt.step()
            if balancer.needs_after_step:
                with torch.no_grad():
                    balancer.after_step(model.losses(*batch)[0])

        return ours


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - start) / n


def measure_times(problem: Problem, specs: list[Spec], fns: dict[str, Callable[[], None]],
                  repeats: int, steps: int, warmup: int) -> tuple[dict[str, float], float]:
    """Median over repeats of (method step time / plain-sum step time), and the median plain-sum
    step time in seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ratios: dict[str, list[float]] = {s.key: [] for s in specs}
    base_times = []
    for _ in range(repeats):
        base = _timed(fns[PLAIN_SUM], steps, problem.device)
        base_times.append(base)
        for s in specs:
            t = _timed(fns[s.key], steps, problem.device)
            after = _timed(fns[PLAIN_SUM], steps, problem.device)
            ratios[s.key].append(t / ((base + after) / 2))
            base = after
            base_times.append(after)
    return ({k: statistics.median(v) for k, v in ratios.items()},
            statistics.median(base_times))


def peak_memory(problem: Problem, fn: Callable[[], None]) -> int:
    """Peak bytes allocated by torch during one step, above what was allocated before it.

    The step runs once first (lazy state such as optimiser buffers is then in place), the
    gradients are released, and the next step is measured: with
    ``torch.cuda.max_memory_allocated`` on CUDA, and on CPU with ``torch.profiler``'s memory
    events (every allocation and release by torch's CPU allocator, in time order), whose running
    sum's maximum is the same quantity. Only torch's allocations are counted, not the Python
    heap or allocator caches.
    """
    device = problem.device
    fn()
    problem.model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _available(spec: Spec, k: int) -> bool:
    """Whether the peer of ``spec`` can be built here (TorchJD and its optional solvers)."""
    try:
        PEERS[spec.name](k)
    except (ImportError, ModuleNotFoundError):
        return False
    return True


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def run_suite(suite: Suite, specs: list[Spec], args: argparse.Namespace,
              device: torch.device) -> list[dict[str, Any]]:
    problem = Problem(suite, device)
    k = len(suite.tasks)
    peers = []
    if args.peers:
        for s in specs:
            if s.grad_on is None and s.name in PEERS:
                p = Spec(f"torchjd:{s.name}")
                if _available(p, k):
                    peers.append(p)
                else:
                    print(f"  peer for {s.key} unavailable (optional TorchJD dependency)",
                          file=sys.stderr)
    everything = [Spec(PLAIN_SUM), *specs, *peers]
    fns = {s.key: problem.step_fn(s) for s in everything}
    with _quiet():
        ratios, base = measure_times(problem, [*specs, *peers], fns, args.repeats, args.steps,
                                     args.warmup)
        memory: dict[str, int | None] = {}
        if not args.no_memory:
            for s in everything:
                memory[s.key] = peak_memory(problem, fns[s.key])
    rows = []
    mib = 2.0**20
    base_mem = memory.get(PLAIN_SUM)
    rows.append({"method": PLAIN_SUM, "time": 1.0, "peak": base_mem,
                 "peer_time": None, "peer_peak": None})
    for s in specs:
        peer = f"torchjd:{s.name}" if s.grad_on is None else None
        rows.append({
            "method": s.key,
            "time": ratios[s.key],
            "peak": memory.get(s.key),
            "peer_time": ratios.get(peer) if peer else None,
            "peer_peak": memory.get(peer) if peer else None,
        })
    print(f"\n{suite.describe()}, device {device}; plain sum step {base * 1e3:.1f} ms "
          f"(median of {args.repeats} repeats x {args.steps} steps)")
    print("| method | time/sum | peak MiB | mem/sum | torchjd time/sum | ours/torchjd time "
          "| torchjd peak MiB | ours/torchjd mem |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak, ppeak = r["peak"], r["peer_peak"]
        mem_ratio = peak / base_mem if peak is not None and base_mem else None
        vs_time = r["time"] / r["peer_time"] if r["peer_time"] else None
        vs_mem = peak / ppeak if peak is not None and ppeak else None
        print(f"| {r['method']} | {_fmt(r['time'])} | {_fmt(None if peak is None else peak / mib, 1)}"
              f" | {_fmt(mem_ratio)} | {_fmt(r['peer_time'])} | {_fmt(vs_time)} | "
              f"{_fmt(None if ppeak is None else ppeak / mib, 1)} | {_fmt(vs_mem)} |")
    sys.stdout.flush()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mtlkit bench speed``."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and few repeats, to check the set-up")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated balancer names; NAME@features for grad_on="
                             "'features' (default: a representative set)")
    parser.add_argument("--suites", default="dense,many", help="dense, many or both")
    parser.add_argument("--peers", action="store_true",
                        help="also time TorchJD's mtl_backward with the same aggregator")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (median reported)")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method")
    parser.add_argument("--no-memory", dest="no_memory", action="store_true",
                        help="skip the peak-memory measurements")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns 0."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    table = suites(args.quick)
    chosen = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in table]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {sorted(table)}")
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    specs = [Spec(m.strip()) for m in args.methods.split(",") if m.strip()]
    known = set(balancers.available())
    bad = [s.key for s in specs if s.name not in known or s.peer or s.key == PLAIN_SUM]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; available: {', '.join(sorted(known))}")
    print(f"mtlkit speed benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in chosen:
        run_suite(table[name], specs, args, device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtlkit bench speed", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "main", "run"]


if __name__ == "__main__":
    raise SystemExit(main())
