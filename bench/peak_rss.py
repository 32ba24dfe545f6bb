"""Step time and the peak memory a step adds to the process, each method in a fresh process.

The speed benchmark counts torch's allocations with the profiler, which is exact but slow on a
large model with many tasks (every allocation is an event). This script measures what a user
sees instead: the process's peak resident set size (``ru_maxrss``) after two steps, above the
same process's peak before the first step (model, batch and optimiser built), and the median
wall time of the steps after the first. Each method runs in its own process, so one method's
peak cannot hide another's. The issue that set the Gram-only engine's targets measured the
ResNet-18, 40-task case this way:

    .venv/bin/python bench/peak_rss.py --suite resnet18 --steps 3 \\
        sum 'mgda' 'mgda[strategy=gramian]' torchjd:mgda mgda@features
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _child(suite: str, key: str, steps: int) -> None:
    import torch

    from mtlkit.benchmarks._models import suites
    from mtlkit.benchmarks.speed import Problem, Spec

    torch.set_num_threads(1)
    problem = Problem(suites(False)[suite], torch.device("cpu"))
    step = problem.step_fn(Spec(key))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"key": key, "added_mib": (peak - before) / 1024,
                      "step_s": statistics.median(times[1:] or times)}))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+", help="as in mtlkit bench speed (sum, torchjd:NAME, "
                                                   "NAME@features, NAME[opt=value])")
    parser.add_argument("--suite", default="resnet18")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.suite, args.methods[0], args.steps)
        return 0
    print(f"suite {args.suite}, {args.steps} steps, 1 thread; peak RSS added by the steps, "
          "median step time after the first")
    print("| method | added peak MiB | step s |")
    print("|---|---|---|")
    for key in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", "--suite", args.suite,
                              "--steps", str(args.steps), key],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"| {key} | failed: {out.stderr.strip().splitlines()[-1:]} | |")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {key} | {res['added_mib']:.0f} | {res['step_s']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
