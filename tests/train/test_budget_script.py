"""bench/budget.py: the README's budget table from two comparisons' files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "budget.py"


def _fake(folder: Path, epochs: int, delta: dict[str, float], trained: dict[str, list[int]],
          improving: dict[str, list[bool]]) -> None:
    methods = {m: {"delta_m": {"mean": d, "std": 0.5, "n": 2},
                   "still_improving": improving[m]} for m, d in delta.items()}
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"config": {"epochs": epochs},
                                                     "methods": methods}))
    for m, counts in trained.items():
        for seed, n in enumerate(counts):
            run = folder / "runs" / m / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({"result": {"history": [{}] * n}}))


def test_budget_table_ranks_both_budgets(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("budget", SCRIPT)
    budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budget)  # type: ignore[union-attr]
    _fake(tmp_path / "a", 25, {"ew": -2.0, "mgda": 1.0}, {"ew": [25, 23], "mgda": [10, 12], "single-a": [7]},
          {"ew": [True, False], "mgda": [False, False]})
    _fake(tmp_path / "b", 100, {"ew": 3.0, "mgda": 0.5}, {"ew": [40, 44], "mgda": [10, 12], "single-a": [7]},
          {"ew": [False, False], "mgda": [False, False]})
    assert budget.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| method | Δm% (25 epochs) | rank | epochs trained | Δm% (100 epochs)")
    # mgda's runs are the same (as many epochs of {}); ew's differ, seed 0 flagged, seed 1 not
    assert out[2] == "| mgda | +1.00 ± 0.50 | 1 | 11.0 | +0.50 ± 0.50 | 2 | 11.0 | 2/2 |"
    assert out[3] == "| ew | -2.00 ± 0.50 ↗1 | 2 | 24.0 | +3.00 ± 0.50 | 1 | 42.0 | 0/2 |"
    assert out[4:] == ["default: best mgda, worst ew", "longer: best ew, worst mgda",
                       "single-task baselines the same under both: 1/1 (↗ at the default: 0)",
                       "runs that differ without a ↗ flag at the default: ew seed1"]
    with pytest.raises(SystemExit, match="no results.json"):
        budget.main([str(tmp_path / "a"), str(tmp_path / "missing")])
