"""Set two comparisons of the same methods side by side: the default budget and a longer one.

Reads the ``results.json`` of each ``mtlkit compare`` folder and prints, per method, Δm% (mean ±
std over seeds), the seeds still improving at the end (↗), the mean number of epochs trained
and the rank by Δm% under each budget, and how many of its seeds trained exactly the same run
(the same validation and test history) under both; then the best and worst method of each
budget, and whether every run that differs was flagged ↗ at the first. The README's budget
table comes from this script:

    ./bin/mtlkit compare --seeds 3 --out reports/multidigits
    ./bin/mtlkit compare --seeds 3 --set epochs=160 --out reports/multidigits-4x
    .venv/bin/python bench/budget.py reports/multidigits reports/multidigits-4x
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def load(folder: str) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no results.json (run mtlkit compare --out {folder} first)")
    return json.loads(path.read_text())


def histories(folder: str, method: str) -> dict[str, list[Any]]:
    """Each seed's history (validation and test metrics per epoch), from the run's files."""
    runs = sorted((Path(folder) / "runs" / method).glob("seed*/result.json"),
                  key=lambda p: int(p.parent.name.removeprefix("seed")))
    return {p.parent.name: json.loads(p.read_text())["result"]["history"] for p in runs}


def epochs(folder: str, method: str) -> float:
    """Mean number of epochs the method's runs trained (from their logs)."""
    counts = [len(h) for h in histories(folder, method).values()]
    return statistics.fmean(counts) if counts else float("nan")


def cell(row: dict[str, Any]) -> str:
    dm = row["delta_m"]
    flag = sum(row.get("still_improving", []))
    return f"{dm['mean']:+.2f} ± {dm['std']:.2f}" + (f" ↗{flag}" if flag else "")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: python bench/budget.py DEFAULT_FOLDER LONGER_FOLDER")
    short, long_ = (load(f) for f in argv)
    methods = [m for m in short["methods"] if m in long_["methods"]]

    def ranks(res: dict[str, Any]) -> dict[str, int]:
        order = sorted(methods, key=lambda m: -res["methods"][m]["delta_m"]["mean"])
        return {m: i + 1 for i, m in enumerate(order)}

    rs, rl = ranks(short), ranks(long_)
    budgets = [f"{res['config']['epochs']} epochs" for res in (short, long_)]
    print(f"| method | Δm% ({budgets[0]}) | rank | epochs trained | Δm% ({budgets[1]}) | rank "
          "| epochs trained | same runs |")
    print("|---|---|---|---|---|---|---|---|")
    unflagged_differ = []
    for m in sorted(methods, key=lambda m: rs[m]):
        a, b = histories(argv[0], m), histories(argv[1], m)
        flags = short["methods"][m].get("still_improving", [])
        same = [seed for seed in a if b.get(seed) == a[seed]]
        for i, seed in enumerate(a):  # in seed order, as the flags
            if seed not in same and not (i < len(flags) and flags[i]):
                unflagged_differ.append(f"{m} {seed}")
        print(f"| {m} | {cell(short['methods'][m])} | {rs[m]} | {epochs(argv[0], m):.1f} "
              f"| {cell(long_['methods'][m])} | {rl[m]} | {epochs(argv[1], m):.1f} "
              f"| {len(same)}/{len(a)} |")
    for name, r in (("default", rs), ("longer", rl)):
        order = sorted(methods, key=lambda m: r[m])
        print(f"{name}: best {order[0]}, worst {order[-1]}")
    baselines = sorted(p.name for p in (Path(argv[0]) / "runs").glob("single-*"))
    changed = [b for b in baselines if histories(argv[0], b) != histories(argv[1], b)]
    print(f"single-task baselines the same under both: {len(baselines) - len(changed)}/"
          f"{len(baselines)} (↗ at the default: {short.get('baseline_still_improving', 0)})")
    print("runs that differ without a ↗ flag at the default: "
          + (", ".join(unflagged_differ) if unflagged_differ else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
