"""How close mtlkit's FAMO comes to the least any Python implementation of it can cost.

On the ``tiny`` suite of ``mtlkit bench speed`` (a 3-task MLP whose step takes ~1 ms), three
steps are timed side by side in one process, in interleaved blocks:

* ``sum+forward``: the plain sum's step plus the no-grad forward FAMO's update reads (the
  reference of ``famo`` in the speed benchmark);
* ``bare``: the same step with FAMO's maths (Liu et al. 2023, Algorithm 1: the weights from
  the softmax of the logits and the losses, then an Adam step of the logits along the drop of
  the log losses) in plain Python floats held in local lists: no validation, no buffers, no
  state to save or resume, no report; the least a Python FAMO does per step;
* ``famo``: ``mtlkit.balancers.FAMO`` in the speed benchmark's step.

It prints each step's median time over the blocks and the median and quartiles of the
per-block ratio to ``sum+forward``. Usage::

    OMP_NUM_THREADS=1 python bench/famo_floor.py [--blocks 40] [--steps 100]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from mtlkit.benchmarks._models import suites
from mtlkit.benchmarks.speed import SUM_FORWARD, Problem, Spec

EPS = 1e-8
LR, GAMMA, BETAS = 0.025, 0.01, (0.9, 0.999)  # FAMO's defaults (official code)


def weights(logits: list[float], losses: list[float]) -> list[float]:
    """FAMO's weights w_k = (z_k / D_k) / sum_i (z_i / D_i), z = softmax(logits), D = L + eps."""
    top = max(logits)
    ratio = [math.exp(a - top) / (x + EPS) for a, x in zip(logits, losses)]
    total = sum(ratio)
    return [r / total for r in ratio]


def update(logits: list[float], m: list[float], v: list[float], count: int,
           before: list[float], after: list[float]
           ) -> tuple[list[float], list[float], list[float]]:
    """One Adam step (``count``-th, from 1) of the logits along the softmax Jacobian times the
    drop of the log losses from ``before`` to ``after``, plus the weight decay; (logits, m, v)."""
    exp, log, sqrt = math.exp, math.log, math.sqrt
    b1, b2 = BETAS
    top = max(logits)
    e = [exp(a - top) for a in logits]
    total = sum(e)
    drop = [log((p + EPS) / (q + EPS)) for p, q in zip(before, after)]
    mean = sum(a * d for a, d in zip(e, drop)) / total
    grad = [a / total * (d - mean) + GAMMA * x for a, d, x in zip(e, drop, logits)]
    c1, c2 = 1 - b1**count, 1 - b2**count
    m = [b1 * a + (1 - b1) * g for a, g in zip(m, grad)]
    v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, grad)]
    return [x - LR * (a / c1) / (sqrt(b / c2) + EPS) for x, a, b in zip(logits, m, v)], m, v


def bare_step(problem: Problem) -> Callable[[], None]:
    """The step with FAMO's maths and nothing else (see the module docstring)."""
    model, batch = problem.model, problem.batch
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    k = len(problem.suite.tasks)
    logits, m, v = [0.0] * k, [0.0] * k, [0.0] * k
    count = 0

    def step() -> None:
        nonlocal logits, m, v, count
        opt.zero_grad(set_to_none=True)
        losses, _ = model.losses(*batch)
        stacked = torch.stack(list(losses.values()))
        before = stacked.tolist()
        stacked.backward(torch.tensor(weights(logits, before)))
        opt.step()
        with torch.no_grad():
            after = [x.item() for x in model.losses(*batch)[0].values()]
        count += 1
        logits, m, v = update(logits, m, v, count, before, after)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=40, help="interleaved blocks (default 40)")
    parser.add_argument("--steps", type=int, default=100, help="steps per block (default 100)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = Problem(suites(quick=False)["tiny"], torch.device("cpu"))
    steps = {SUM_FORWARD: problem.step_fn(Spec(SUM_FORWARD)), "bare": bare_step(problem),
             "famo": problem.step_fn(Spec("famo"))}
    for step in steps.values():
        for _ in range(args.steps):
            step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(args.blocks):
        for key, step in steps.items():
            start = time.process_time()
            for _ in range(args.steps):
                step()
            times[key].append((time.process_time() - start) / args.steps)
    print(f"tiny suite, 1 thread, process CPU time; {args.blocks} interleaved blocks of "
          f"{args.steps} steps\n")
    print(f"| step | median us | /{SUM_FORWARD} median | quartiles |")
    print("|---|---|---|---|")
    for key, values in times.items():
        ratios = [a / b for a, b in zip(values, times[SUM_FORWARD])]
        q1, _, q3 = statistics.quantiles(ratios)
        print(f"| {key} | {statistics.median(values) * 1e6:.0f} | "
              f"{statistics.median(ratios):.3f} | {q1:.3f}-{q3:.3f} |")


if __name__ == "__main__":
    main()
