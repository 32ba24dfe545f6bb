"""Compare balancers on one dataset: single-task baselines, every method, Δm, ranks, step times.

Everything a table shows is computed here and written to ``results.json``; the report and the
printed table are built from that file only, so they cannot disagree.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlkit import balancers
from mtlkit.data import DatasetBundle, load
from mtlkit.metrics import delta_m
from mtlkit.tasks import Task
from mtlkit.train.models import default_model
from mtlkit.train.trainer import RunResult, TrainConfig, Trainer

#: A representative default set: plain sum, four loss weightings, four gradient methods.
DEFAULT_METHODS = ("ew", "uw", "dwa", "rlw", "famo", "mgda", "pcgrad", "cagrad", "imtl", "nash_mtl")
REFERENCE = "ew"


@dataclass
class CompareConfig:
    """A comparison. Load one from YAML with :func:`compare_config_from_dict`."""

    dataset: str = "multidigits"
    root: str | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: int = 1
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    task_lr: dict[str, float] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    out: str = "reports/compare"
    device: str = "cpu"

    def validate(self) -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("methods must be a non-empty list of balancer names")
        known = balancers.available()
        for m in self.methods:
            if m not in known:
                raise ValueError(f"methods: unknown method {m!r}; available: {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat a name, got {self.methods}")
        for m, hp in self.hparams.items():
            if m not in self.methods:
                raise ValueError(f"hparams.{m}: {m!r} is not one of the methods {self.methods}")
            if not isinstance(hp, dict):
                raise ValueError(f"hparams.{m} must be a mapping of hyperparameters")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {self.seeds!r}")
        self.train_config(0).validate(list(self.task_lr))  # field checks; task names later


    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           task_lr=dict(self.task_lr), seed=seed, device=self.device,
                           progress=False)


def compare_config_from_dict(data: Mapping[str, Any]) -> CompareConfig:
    """Build a :class:`CompareConfig` from parsed YAML/JSON; unknown fields are an error."""
    if not isinstance(data, Mapping):
        raise ValueError("the config must be a mapping of field: value")
    names = {f.name for f in fields(CompareConfig)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; fields are {sorted(names)}")
    cfg = CompareConfig(**dict(data))
    cfg.validate()
    return cfg


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the baselines and every method for every seed; write and return ``results.json``."""
    cfg.validate()
    methods = list(cfg.methods)
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # the step-time ratio is measured against the plain sum
    bundle = load(cfg.dataset, root=cfg.root, **cfg.dataset_options)
    tasks = list(bundle.tasks)
    names = [t.name for t in tasks]
    unknown = [t for t in cfg.task_lr if t not in names]
    if unknown:
        raise ValueError(f"task_lr: unknown task(s) {unknown}; tasks of {cfg.dataset} are {names}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(cfg.seeds):
        for task in tasks:
            key = f"single:{task.name}"
            log(f"[seed {seed}] single-task baseline {task.name}")
            res = _train(bundle, [task], "ew", {}, cfg, seed, out / "runs" / key.replace(":", "-"))
            runs.setdefault(key, []).append(res.to_json())
        for m in methods:
            log(f"[seed {seed}] {m}")
            res = _train(bundle, tasks, m, cfg.hparams.get(m, {}), cfg, seed, out / "runs" / m)
            runs.setdefault(m, []).append(res.to_json())

    results = summarise(runs, tasks, methods)
    results["config"] = asdict(cfg)
    results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_results_csv(results, out / "results.csv")
    return results


def train_one(cfg: CompareConfig, *, seed: int = 0, resume: bool = False) -> RunResult:
    """Train ``cfg.methods[0]`` alone into ``cfg.out`` (``mtlkit train``), or resume it."""
    cfg.validate()
    bundle = load(cfg.dataset, root=cfg.root, **cfg.dataset_options)
    method = cfg.methods[0]
    return _train(bundle, list(bundle.tasks), method, cfg.hparams.get(method, {}), cfg, seed,
                  Path(cfg.out), resume=resume)


def _train(bundle: DatasetBundle, tasks: Sequence[Task], method: str, hparams: dict[str, Any],
           cfg: CompareConfig, seed: int, run_dir: Path, resume: bool = False) -> RunResult:
    torch.manual_seed(seed)
    model: nn.Module = default_model(bundle.input_shape, tasks)
    balancer = balancers.create(method, tasks=[t.name for t in tasks], **hparams)
    trainer = Trainer(model, tasks, balancer, cfg.train_config(seed), run_dir / f"seed{seed}")
    return trainer.fit(bundle.train, bundle.val, bundle.test, resume=resume)


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
    table: dict[str, dict[str, Any]] = {}
    ref_time = statistics.fmean(r["step_time"] for r in runs[REFERENCE])
    for m in methods:
        per_seed = runs[m]
        dms = [delta_m({k: r["test"][k] for k in keys}, baseline, higher) for r in per_seed]
        table[m] = {
            "metrics": {k: _mean_std([r["test"][k] for r in per_seed]) for k in keys},
            "delta_m": _mean_std(dms),
            "time_ratio": statistics.fmean(r["step_time"] for r in per_seed) / ref_time,
            "selected_epochs": [r["selected_epoch"] for r in per_seed],
        }
    # mean rank over metrics (1 = best), on the seed-mean of each metric
    for k in keys:
        order = sorted(methods, key=lambda m: table[m]["metrics"][k]["mean"], reverse=higher[k])
        for rank, m in enumerate(order, start=1):
            table[m].setdefault("_ranks", []).append(rank)
    for m in methods:
        table[m]["mean_rank"] = statistics.fmean(table[m].pop("_ranks"))
    return {
        "tasks": [t.name for t in tasks],
        "primary": {t.name: f"{t.name}/{t.primary}" for t in tasks},
        "metrics": keys,
        "higher_is_better": higher,
        "baseline": baseline,
        "methods": table,
        "runs": dict(runs),
    }


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
    order = sorted(results["methods"], key=lambda m: -results["methods"][m]["delta_m"]["mean"])
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


