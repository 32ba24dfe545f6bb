"""Compare balancers on one dataset: single-task baselines, every method, Δm, ranks, step times.

Everything a table shows is computed here and written to ``results.json``; the report and the
printed table are built from that file only, so they cannot disagree.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtlkit import balancers
from mtlkit.data import DatasetBundle
from mtlkit.engine._dist import rank
from mtlkit.experiment import Experiment
from mtlkit.metrics import delta_m
from mtlkit.tasks import Task
from mtlkit.train.trainer import CHECKPOINT, RESULT, RunResult, Trainer, check_same_settings

#: The step-time ratio of every method is measured against the plain sum.
REFERENCE = "ew"

#: The config of a comparison is an :class:`~mtlkit.experiment.Experiment` (kept under its
#: old names for code that imported them from here).
CompareConfig = Experiment
compare_config_from_dict = Experiment.from_dict


def run_compare(cfg: Experiment, log: Callable[[str], None] = print, *,
                resume: bool = False) -> dict[str, Any]:
    """Train the baselines and every method for every seed; write and return ``results.json``.

    With ``resume``, a finished run (its ``result.json`` is there) is not trained again and
    an interrupted one continues from its checkpoint, so an interrupted comparison picks up
    where it stopped; either must have been made with the same settings (else an error names
    the fields that differ).
    """
    cfg.validate()
    methods = list(cfg.methods)
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # the step-time ratio is measured against the plain sum
    bundle = cfg.load_data()
    tasks = list(bundle.tasks)
    names = [t.name for t in tasks]
    check_methods(cfg, methods, names)
    out = Path(cfg.out or "reports/compare")
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in cfg.seed_list():
        for task in tasks:
            key = f"single:{task.name}"
            log(f"[seed {seed}] single-task baseline {task.name}")
            res = _run(cfg, bundle, [task], "ew", seed, run_dir(out, key, seed), resume)
            runs.setdefault(key, []).append(res)
        for m in methods:
            log(f"[seed {seed}] {m}")
            res = _run(cfg, bundle, tasks, m, seed, run_dir(out, m, seed), resume)
            runs.setdefault(m, []).append(res)

    results = summarise(runs, tasks, methods)
    results["config"] = cfg.to_dict()
    results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if rank() == 0:  # under torchrun, one writer
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_results_csv(results, out / "results.csv")
    return results


def train_one(cfg: Experiment, *, seed: int = 0, resume: bool = False) -> RunResult:
    """Train ``cfg.methods[0]`` alone into ``cfg.out`` (``mtlkit train``), or resume it."""
    cfg.validate()
    bundle = cfg.load_data()
    method = cfg.methods[0]
    check_methods(cfg, [method], bundle.task_names)
    trainer = _trainer(cfg, bundle, list(bundle.tasks), method, seed,
                       Path(cfg.out or f"runs/{method}"), keep="last")
    if resume and not (trainer.out_dir / CHECKPOINT).is_file():  # type: ignore[operator]
        raise FileNotFoundError(f"--resume: no checkpoint at {trainer.out_dir / CHECKPOINT} "
                                f"(a finished run keeps one only with keep_checkpoint: last)")
    return trainer.fit(bundle.train, bundle.val, bundle.test, resume=resume)


def check_methods(cfg: Experiment, methods: Sequence[str], tasks: Sequence[str]) -> None:
    """Fail before any training: per-task learning rates name real tasks, and every method
    builds with its hyperparameters on these tasks (errors are prefixed with the field)."""
    unknown = [t for t in cfg.task_lr if t not in tasks]
    if unknown:
        raise ValueError(f"task_lr: unknown task(s) {unknown}; tasks of {cfg.dataset} are "
                         f"{list(tasks)}")
    for m in methods:
        try:
            balancers.create(m, tasks=list(tasks), **cfg.hparams.get(m, {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"hparams.{m}: {err}") from None


def _trainer(cfg: Experiment, bundle: DatasetBundle, tasks: Sequence[Task], method: str,
             seed: int, out_dir: Path, keep: str) -> Trainer:
    torch.manual_seed(seed)
    model = cfg.build_model(bundle, tasks)
    hparams = cfg.hparams.get(method, {})
    balancer = balancers.create(method, tasks=[t.name for t in tasks], **hparams)
    name, options = cfg.model_spec(bundle)
    return Trainer(model, tasks, balancer, cfg.train_config(seed, keep=keep), out_dir,
                   settings=cfg.run_settings(method, name, options))


def _run(cfg: Experiment, bundle: DatasetBundle, tasks: Sequence[Task], method: str, seed: int,
         out_dir: Path, resume: bool) -> dict[str, Any]:
    """One run of a comparison, as JSON: reused when finished, resumed when interrupted."""
    trainer = _trainer(cfg, bundle, tasks, method, seed, out_dir, keep="none")
    done = out_dir / RESULT
    if resume and done.is_file():
        try:
            saved = json.loads(done.read_text())
            settings, result = saved["settings"], saved["result"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{done}: not a finished run's record (delete it to retrain the "
                             f"run)") from None
        check_same_settings(settings, trainer.settings, done)
        if saved.get("budget") == {"epochs": cfg.epochs, "max_steps": cfg.max_steps}:
            return dict(result)  # else: a longer budget continues from the checkpoint if any
    can_resume = resume and (out_dir / CHECKPOINT).is_file()
    return trainer.fit(bundle.train, bundle.val, bundle.test, resume=can_resume).to_json()


def run_dir(out: Path, key: str, seed: int) -> Path:
    """Where a comparison keeps the logs of one run (``key``: a method or ``single:<task>``)."""
    return out / "runs" / key.replace(":", "-") / f"seed{seed}"


def summarise(runs: Mapping[str, list[dict[str, Any]]], tasks: Sequence[Task],
              methods: Sequence[str]) -> dict[str, Any]:
    """Baselines, per-method metrics (mean and std over seeds), Δm%, mean rank, time ratio."""
    higher = {f"{t.name}/{name}": m.higher_is_better
              for t in tasks for name, m in t.metrics().items()}
    keys = list(higher)
    baseline = {}
    for t in tasks:
        for k in keys:
            if k.startswith(f"{t.name}/"):
                baseline[k] = statistics.fmean(r["test"][k] for r in runs[f"single:{t.name}"])
    # Δm is a relative change: a metric whose baseline is 0 or undefined cannot enter it
    dm_keys = [k for k in keys if math.isfinite(baseline[k]) and baseline[k] != 0]
    table: dict[str, dict[str, Any]] = {}
    ref_time = statistics.fmean(r["step_time"] for r in runs[REFERENCE])
    for m in methods:
        per_seed = runs[m]
        dms = [_delta_m(r["test"], baseline, higher, dm_keys) for r in per_seed]
        table[m] = {
            "metrics": {k: _mean_std([r["test"][k] for r in per_seed]) for k in keys},
            "delta_m": _mean_std(dms),
            "time_ratio": statistics.fmean(r["step_time"] for r in per_seed) / ref_time,
            "selected_epochs": [r["selected_epoch"] for r in per_seed],
        }
    # mean rank over metrics (1 = best), on the seed-mean of each metric
    for k in keys:
        sign = -1.0 if higher[k] else 1.0
        order = sorted(methods, key=lambda m: _nan_last(sign * table[m]["metrics"][k]["mean"]))
        for position, m in enumerate(order, start=1):
            table[m].setdefault("_ranks", []).append(position)
    for m in methods:
        table[m]["mean_rank"] = statistics.fmean(table[m].pop("_ranks"))
    return {
        "tasks": [t.name for t in tasks],
        "primary": {t.name: f"{t.name}/{t.primary}" for t in tasks},
        "metrics": keys,
        "higher_is_better": higher,
        "baseline": baseline,
        "delta_m_metrics": dm_keys,
        "delta_m_excluded": [k for k in keys if k not in dm_keys],
        "methods": table,
        "runs": dict(runs),
    }


def _delta_m(test: Mapping[str, float], baseline: Mapping[str, float],
             higher: Mapping[str, bool], keys: Sequence[str]) -> float:
    """Δm% of one run over ``keys``; NaN when a metric of the run is not finite or no metric
    has a usable baseline (shown as such in the table, never silently zero)."""
    values = {k: test[k] for k in keys}
    if not keys or not all(math.isfinite(v) for v in values.values()):
        return math.nan
    return delta_m(values, {k: baseline[k] for k in keys}, {k: higher[k] for k in keys})


def _nan_last(value: float) -> tuple[bool, float]:
    """Sort key: ascending, NaN after every number."""
    return (math.isnan(value), value)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def format_table(results: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table (from ``results.json`` only)."""
    keys = results["metrics"]
    seeds = max(v["delta_m"]["n"] for v in results["methods"].values())

    def cell(ms: Mapping[str, float], digits: int) -> str:
        s = f"{ms['mean']:.{digits}f}"
        return s + (f" ± {ms['std']:.{digits}f}" if seeds > 1 else "")

    arrows = ["↑" if results["higher_is_better"][k] else "↓" for k in keys]
    head = ["method", *[f"{k} {a}" for k, a in zip(keys, arrows)], "Δm% ↑", "mean rank ↓",
            "time × ew"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = ["single-task", *[f"{results['baseline'][k]:.4f}" for k in keys], "0.00", "", ""]
    lines.append("| " + " | ".join(base) + " |")
    order = sorted(results["methods"],
                   key=lambda m: _nan_last(-results["methods"][m]["delta_m"]["mean"]))
    for m in order:
        row = results["methods"][m]
        cells = [m, *[cell(row["metrics"][k], 4) for k in keys], cell(row["delta_m"], 2),
                 f"{row['mean_rank']:.2f}", f"{row['time_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results_csv(results: Mapping[str, Any], path: Path) -> None:
    keys = results["metrics"]
    cols = ["method", *[f"{k}_{s}" for k in keys for s in ("mean", "std")],
            "delta_m_mean", "delta_m_std", "mean_rank", "time_ratio"]
    rows = [",".join(cols)]
    for m, row in results["methods"].items():
        vals = [m]
        for k in keys:
            vals += [repr(row["metrics"][k]["mean"]), repr(row["metrics"][k]["std"])]
        vals += [repr(row["delta_m"]["mean"]), repr(row["delta_m"]["std"]),
                 repr(row["mean_rank"]), repr(row["time_ratio"])]
        rows.append(",".join(vals))
    path.write_text("\n".join(rows) + "\n")


