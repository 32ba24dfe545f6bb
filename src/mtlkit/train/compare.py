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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlkit import balancers
from mtlkit.data import DatasetBundle, load
from mtlkit.engine._dist import rank
from mtlkit.metrics import delta_m
from mtlkit.tasks import Task
from mtlkit.train.models import build_model
from mtlkit.train.trainer import CHECKPOINT, RunResult, TrainConfig, Trainer

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
    max_steps: int | None = None
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
                # a bad value in a config file, like every other field's: ValueError
                raise ValueError(f"hparams.{m} must be a mapping of hyperparameters")  # noqa: TRY004
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1, got {self.seeds!r}")
        self.train_config(0).validate(list(self.task_lr))  # field checks; task names later


    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, max_steps=self.max_steps,
                           batch_size=self.batch_size, lr=self.lr,
                           task_lr=dict(self.task_lr), seed=seed, device=self.device,
                           progress=False)


def compare_config_from_dict(data: Mapping[str, Any]) -> CompareConfig:
    """Build a :class:`CompareConfig` from parsed YAML/JSON; unknown fields are an error."""
    if not isinstance(data, Mapping):
        raise ValueError("the config must be a mapping of field: value")  # noqa: TRY004
    names = {f.name for f in fields(CompareConfig)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; fields are {sorted(names)}")
    cfg = CompareConfig(**dict(data))
    cfg.validate()
    return cfg


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print, *,
                resume: bool = False) -> dict[str, Any]:
    """Train the baselines and every method for every seed; write and return ``results.json``.

    With ``resume``, each run continues from the checkpoint it left in ``cfg.out`` (a finished
    run is not trained again), so an interrupted comparison picks up where it stopped.
    """
    cfg.validate()
    methods = list(cfg.methods)
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # the step-time ratio is measured against the plain sum
    bundle = load(cfg.dataset, root=cfg.root, **cfg.dataset_options)
    tasks = list(bundle.tasks)
    names = [t.name for t in tasks]
    check_methods(cfg, methods, names)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(cfg.seeds):
        for task in tasks:
            key = f"single:{task.name}"
            log(f"[seed {seed}] single-task baseline {task.name}")
            where = run_dir(out, key, seed)
            res = _train(bundle, [task], "ew", {}, cfg, seed, where, _can_resume(where, resume))
            runs.setdefault(key, []).append(res.to_json())
        for m in methods:
            log(f"[seed {seed}] {m}")
            where = run_dir(out, m, seed)
            res = _train(bundle, tasks, m, cfg.hparams.get(m, {}), cfg, seed, where,
                         _can_resume(where, resume))
            runs.setdefault(m, []).append(res.to_json())

    results = summarise(runs, tasks, methods)
    results["config"] = asdict(cfg)
    results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if rank() == 0:  # under torchrun, one writer
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_results_csv(results, out / "results.csv")
    return results


def train_one(cfg: CompareConfig, *, seed: int = 0, resume: bool = False) -> RunResult:
    """Train ``cfg.methods[0]`` alone into ``cfg.out`` (``mtlkit train``), or resume it."""
    cfg.validate()
    bundle = load(cfg.dataset, root=cfg.root, **cfg.dataset_options)
    method = cfg.methods[0]
    check_methods(cfg, [method], bundle.task_names)
    return _train(bundle, list(bundle.tasks), method, cfg.hparams.get(method, {}), cfg, seed,
                  Path(cfg.out), resume=resume)


def check_methods(cfg: CompareConfig, methods: Sequence[str], tasks: Sequence[str]) -> None:
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


def _train(bundle: DatasetBundle, tasks: Sequence[Task], method: str, hparams: dict[str, Any],
           cfg: CompareConfig, seed: int, out_dir: Path, resume: bool = False) -> RunResult:
    torch.manual_seed(seed)
    model: nn.Module = build_model(
        bundle.model, tasks, bundle.input_shape, **bundle.model_options
    )
    balancer = balancers.create(method, tasks=[t.name for t in tasks], **hparams)
    trainer = Trainer(model, tasks, balancer, cfg.train_config(seed), out_dir)
    return trainer.fit(bundle.train, bundle.val, bundle.test, resume=resume)


def _can_resume(where: Path, resume: bool) -> bool:
    """A run of an interrupted comparison resumes if it left a checkpoint, else starts."""
    return resume and (where / CHECKPOINT).is_file()


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


