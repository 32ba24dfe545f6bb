"""Compare balancers on one dataset: single-task baselines, every method, Δm, ranks, step times.

Everything a table shows is computed here and written to ``results.json``; the report and the
printed table are built from that file only, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from mtlkit import balancers
from mtlkit.data import DatasetBundle
from mtlkit.engine._dist import rank
from mtlkit.experiment import DELTA_M, Experiment
from mtlkit.metrics import delta_m, delta_p, mean_rank
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
    check_baselines(cfg.baselines, tasks)
    out = Path(cfg.out or "reports/compare")
    out.mkdir(parents=True, exist_ok=True)

    given_tasks = {k.split("/", 1)[0] for k in cfg.baselines}
    jobs: list[tuple[str, list[str], str, int]] = []  # (key, its tasks, method, seed)
    for seed in cfg.seed_list():
        for task in (t for t in tasks if t.name not in given_tasks):  # the others are given
            jobs.append((f"single:{task.name}", [task.name], "ew", seed))
        jobs.extend((m, names, m, seed) for m in methods)
    runs: dict[str, list[dict[str, Any]]] = {}
    for (key, *_), res in zip(jobs, _run_all(cfg, bundle, jobs, out, resume, log)):
        runs.setdefault(key, []).append(res)

    results = summarise(runs, tasks, methods, cfg.baselines)
    results["config"] = cfg.to_dict()
    results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["versions"] = versions()
    if rank() == 0:  # under torchrun, one writer
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_results_csv(results, out / "results.csv")
    return results


def versions() -> dict[str, str]:
    """The versions a result was obtained with (mtlkit, PyTorch, Python, NumPy)."""
    import platform

    import numpy

    import mtlkit

    return {"mtlkit": mtlkit.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "numpy": numpy.__version__}


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
    with _torch_threads(cfg.parallelism(1)[1]):  # one run: every core unless `threads` says
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


def check_baselines(given: Mapping[str, float], tasks: Sequence[Task]) -> None:
    """Given single-task values must name real ``task/metric`` keys (before any training)."""
    keys = [f"{t.name}/{name}" for t in tasks for name in t.metrics()]
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"baselines: unknown metric(s) {unknown}; metrics are {keys}")


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


def _run_all(cfg: Experiment, bundle: DatasetBundle, jobs: Sequence[tuple[str, list[str], str, int]],
             out: Path, resume: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every run's result, in the order of ``jobs``: one after the other, or in
    ``cfg.parallelism()`` processes at once (a run's result does not depend on which)."""
    processes, threads = cfg.parallelism(len(jobs))
    if processes > 1:
        log(f"{len(jobs)} runs, {processes} at a time, {threads} torch thread(s) each")
    done = 0

    def report(key: str, seed: int, res: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        name = f"single-task baseline {key[7:]}" if key.startswith("single:") else key
        log(f"[{done}/{len(jobs)}] [seed {seed}] {name}: {len(res.get('history', []))} "
            f"epochs{' (still improving)' if res.get('still_improving') else ''}")

    if processes == 1:
        with _torch_threads(threads):
            results = []
            for key, names, method, seed in jobs:
                res = _run(cfg, bundle, _subset(bundle, names), method, seed,
                           run_dir(out, key, seed), resume)
                report(key, seed, res)
                results.append(res)
            return results
    # A forked worker inherits everything (datasets registered at run time, the loaded data);
    # it is safe with one thread (GNU OpenMP is not fork-safe once it has started threads).
    method_ = "fork" if threads == 1 and "fork" in mp.get_all_start_methods() else "spawn"
    global _WORKER_BUNDLE
    _WORKER_BUNDLE = bundle
    try:
        with ProcessPoolExecutor(processes, mp_context=mp.get_context(method_),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(_run_in_worker, cfg.to_dict(), names, method, seed,
                                   str(run_dir(out, key, seed)), resume)
                       for key, names, method, seed in jobs]
            where = {f: (key, seed) for f, (key, _, _, seed) in zip(futures, jobs)}
            try:
                for f in as_completed(futures):
                    report(*where[f], f.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a failed run ends the comparison now
                raise
            return [f.result() for f in futures]
    finally:
        _WORKER_BUNDLE = None


#: The dataset a worker process trains on (inherited when forked, loaded once when spawned).
_WORKER_BUNDLE: DatasetBundle | None = None


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(cfg_data: dict[str, Any], names: list[str], method: str, seed: int,
                   out_dir: str, resume: bool) -> dict[str, Any]:
    global _WORKER_BUNDLE
    cfg = Experiment.from_dict(cfg_data)
    if _WORKER_BUNDLE is None:
        _WORKER_BUNDLE = cfg.load_data()
    bundle = _WORKER_BUNDLE
    return _run(cfg, bundle, _subset(bundle, names), method, seed, Path(out_dir), resume)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _subset(bundle: DatasetBundle, names: Sequence[str]) -> list[Task]:
    return [t for t in bundle.tasks if t.name in names]


def run_dir(out: Path, key: str, seed: int) -> Path:
    """Where a comparison keeps the logs of one run (``key``: a method or ``single:<task>``)."""
    return out / "runs" / key.replace(":", "-") / f"seed{seed}"


def summarise(runs: Mapping[str, list[dict[str, Any]]], tasks: Sequence[Task],
              methods: Sequence[str], given: Mapping[str, float] | None = None
              ) -> dict[str, Any]:
    """Baselines, per-method metrics (mean and std over seeds), Δm%, Δp, mean rank, time ratio.

    ``runs`` maps each method, and ``single:<task>`` for every task without ``given`` baseline
    values, to its runs' ``RunResult.to_json()``. ``given`` (``task/metric -> value``, e.g. a
    paper's single-task numbers) replaces the trained baseline of its tasks; those tasks' Δ use
    the given metrics only.

    Two Δm% are kept per method: ``delta_m`` over every metric (Maninis et al. 2019) and
    ``delta_m_per_task`` over each task's one ``primary`` metric, the definition of the
    dense-prediction survey (Vandenhende et al. 2021, arXiv:2004.13379, Eq. 10). The
    experiment's ``delta_m`` field (``results["config"]``) says which orders the table
    (:func:`delta_m_key`).
    """
    given = dict(given or {})
    check_baselines(given, tasks)
    higher = {f"{t.name}/{name}": m.higher_is_better
              for t in tasks for name, m in t.metrics().items()}
    keys = list(higher)
    given_tasks = {k.split("/", 1)[0] for k in given}
    baseline: dict[str, float] = {}
    baseline_std: dict[str, float] = {}
    for t in tasks:
        for k in (k for k in keys if k.startswith(f"{t.name}/")):
            if t.name in given_tasks:
                baseline[k] = float(given.get(k, math.nan))  # a metric not given: no Δ
                baseline_std[k] = math.nan
            else:
                stats = _mean_std([r["test"][k] for r in runs[f"single:{t.name}"]])
                baseline[k], baseline_std[k] = stats["mean"], stats["std"]
    # Δ is a relative change: a metric whose baseline is 0 or undefined cannot enter it
    dm_keys = [k for k in keys if math.isfinite(baseline[k]) and baseline[k] != 0]
    primaries = [f"{t.name}/{t.primary}" for t in tasks]
    task_keys = [k for k in primaries if k in dm_keys]  # the survey's Δm: one metric per task
    table: dict[str, dict[str, Any]] = {}
    ref_time = statistics.fmean(r["step_time"] for r in runs[REFERENCE])
    for m in methods:
        per_seed = runs[m]
        table[m] = {
            "metrics": {k: _mean_std([r["test"][k] for r in per_seed]) for k in keys},
            "delta_m": _mean_std([_delta(r["test"], baseline, higher, dm_keys, delta_m)
                                  for r in per_seed]),
            "delta_m_per_task": _mean_std([_delta(r["test"], baseline, higher, task_keys,
                                                  delta_m) for r in per_seed]),
            "delta_p": _mean_std([_delta(r["test"], baseline, higher, dm_keys, delta_p)
                                  for r in per_seed]),
            "time_ratio": statistics.fmean(r["step_time"] for r in per_seed) / ref_time,
            "selected_epochs": [r["selected_epoch"] for r in per_seed],
            "epochs_trained": [len(r["history"]) for r in per_seed],
            "still_improving": [bool(r.get("still_improving", False)) for r in per_seed],
        }
    one_task = len(tasks) == 1
    # on the seed-mean of each metric; ties share their average rank. With one task every
    # method trains the same single loss: ranking them would rank noise, so there is no rank.
    ranks = {} if one_task else mean_rank(
        {m: {k: table[m]["metrics"][k]["mean"] for k in keys} for m in methods}, higher)
    for m in methods:
        table[m]["mean_rank"] = ranks.get(m, math.nan)
    single_runs = [r for key, rs in runs.items() if key.startswith("single:") for r in rs]
    return {
        "tasks": [t.name for t in tasks],
        "primary": {t.name: f"{t.name}/{t.primary}" for t in tasks},
        "metrics": keys,
        "higher_is_better": higher,
        "baseline": baseline,
        "baseline_std": baseline_std,
        "baseline_given": sorted(given),
        "baseline_still_improving": sum(bool(r.get("still_improving")) for r in single_runs),
        "delta_m_metrics": dm_keys,
        "delta_m_excluded": [k for k in keys if k not in dm_keys],
        "delta_m_per_task_metrics": task_keys,
        "delta_m_per_task_excluded": [k for k in primaries if k not in task_keys],
        "order_by": None if one_task else "delta_m",
        "single_task": one_task,
        "methods": table,
        "runs": dict(runs),
    }


def _delta(test: Mapping[str, float], baseline: Mapping[str, float], higher: Mapping[str, bool],
           keys: Sequence[str], fn: Callable[..., float]) -> float:
    """Δm% or Δp (``fn``) of one run over ``keys``; NaN when a metric of the run is not finite
    or no metric has a usable baseline (shown as such in the table, never silently zero)."""
    values = {k: test[k] for k in keys}
    if not keys or not all(math.isfinite(v) for v in values.values()):
        return math.nan
    return fn(values, {k: baseline[k] for k in keys}, {k: higher[k] for k in keys})


def _nan_last(value: float) -> tuple[bool, float]:
    """Sort key: ascending, NaN after every number."""
    return (math.isnan(value), value)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


#: Marks a method's name in the table when a run was still improving at its last epoch.
IMPROVING = "↗"

_DM_ALL = (
    "Δm% is the mean over every metric of the sign-corrected relative gain over the single-task "
    "baseline, in percent (Maninis et al. 2019; Vandenhende et al. 2021; as reported by MTAN, "
    "Nash-MTL and FAMO)."
)
_DM_PER_TASK = (
    "Δm% is the dense-prediction survey's: the mean over tasks of the sign-corrected relative "
    "gain of each task's one primary metric over the single-task baseline, in percent "
    "(Vandenhende et al. 2021, arXiv:2004.13379, Eq. 10; here over {metrics}); the other metrics "
    "are shown but not averaged."
)
_REST = (
    " Δp is the mean over tasks of each task's mean relative gain over its "
    "metrics, in percent (LibMTL; DB-MTL); when every task has as many metrics as the others, "
    "Δp equals the Δm% over every metric. "
    "Positive is better for both. Mean rank averages each method's rank (1 = best) over the "
    "metrics, on the seed means; tied methods share the average of their ranks. "
    "`time × ew` is the median training step time divided by the plain sum's."
)
#: The definitions under a table whose Δm% is over every metric (the default).
DEFINITIONS = _DM_ALL + _REST

def delta_m_definition(results: Mapping[str, Any]) -> str:
    """``all_metrics`` or ``per_task``: the experiment's ``delta_m`` (all_metrics when the
    results carry no config)."""
    chosen = str(results.get("config", {}).get("delta_m") or "all_metrics")
    if chosen not in DELTA_M:
        raise ValueError(f"results: config.delta_m must be one of {list(DELTA_M)}, got {chosen!r}")
    return chosen


def delta_m_key(results: Mapping[str, Any]) -> str:
    """The per-method entry holding the Δm% that orders the table: ``delta_m`` (every metric)
    or ``delta_m_per_task`` (one primary metric per task, the survey's).

    Example:
        >>> delta_m_key({"config": {"delta_m": "per_task"}}), delta_m_key({})
        ('delta_m_per_task', 'delta_m')
    """
    return "delta_m_per_task" if delta_m_definition(results) == "per_task" else "delta_m"


def definitions(results: Mapping[str, Any]) -> str:
    """The text defining the table's columns, naming the Δm% definition it uses."""
    if delta_m_key(results) == "delta_m":
        return DEFINITIONS
    metrics = ", ".join(results.get("delta_m_per_task_metrics", [])) or "no metric"
    return _DM_PER_TASK.format(metrics=metrics) + _REST


def _dm(row: Mapping[str, Any], key: str) -> Mapping[str, float]:
    return row.get(key, {"mean": math.nan, "std": math.nan, "n": 1})


def method_order(results: Mapping[str, Any]) -> list[str]:
    """The table's row order: by Δm% (best first; the definition of :func:`delta_m_key`), or
    as configured for a single task."""
    methods = list(results["methods"])
    if results.get("order_by") is None and results.get("single_task"):
        return methods
    key = delta_m_key(results)
    return sorted(methods, key=lambda m: _nan_last(-_dm(results["methods"][m], key)["mean"]))


def table_notes(results: Mapping[str, Any]) -> list[str]:
    """What a reader needs beside the table: its order, flags and given baselines."""
    notes = []
    if results.get("single_task"):
        notes.append(f"One task only ({results['tasks'][0]}): every method trains the same single "
                     "loss, so the methods are not ranked; Δm% and Δp compare each with the "
                     "single-task baseline.")
    elif delta_m_key(results) == "delta_m_per_task":
        notes.append("Rows are ordered by Δm% (best first), the survey's definition: one primary "
                     "metric per task (" + ", ".join(results.get("delta_m_per_task_metrics", []))
                     + ").")
    else:
        notes.append("Rows are ordered by Δm% (best first), over every metric.")
    flagged = [m for m, row in results["methods"].items() if any(row.get("still_improving", []))]
    if flagged or results.get("baseline_still_improving"):
        who = ", ".join(f"{m} ({sum(results['methods'][m]['still_improving'])} of "
                        f"{len(results['methods'][m]['still_improving'])} seeds)"
                        for m in flagged)
        if results.get("baseline_still_improving"):
            who += (", " if who else "") + (f"{results['baseline_still_improving']} "
                                            "single-task run(s)")
        notes.append(f"{IMPROVING} still improving: the validation score was still rising "
                     "within the last `patience` epochs (by more than `min_delta`, when set), so "
                     f"the budget, not early stopping, ended the run: {who}.")
    if results.get("baseline_given"):
        notes.append("Single-task values of " + ", ".join(results["baseline_given"]) +
                     " are given in the config (published numbers), not trained (no ± std).")
    return notes


def delta_m_label(results: Mapping[str, Any]) -> str:
    """The Δm% column's heading: ``Δm% ↑`` (every metric) or ``Δm% per task ↑`` (the survey's)."""
    return "Δm% per task ↑" if delta_m_key(results) == "delta_m_per_task" else "Δm% ↑"


def format_table(results: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table and its notes (from ``results.json`` only)."""
    keys = results["metrics"]
    one_task = bool(results.get("single_task"))
    seeds = max(v["delta_m"]["n"] for v in results["methods"].values())

    def cell(ms: Mapping[str, float], digits: int) -> str:
        if not math.isfinite(ms["mean"]):
            return "—"
        s = f"{ms['mean']:.{digits}f}"
        return s + (f" ± {ms['std']:.{digits}f}" if seeds > 1 and math.isfinite(ms["std"]) else "")

    dm_key = delta_m_key(results)
    arrows = ["↑" if results["higher_is_better"][k] else "↓" for k in keys]
    head = ["method", *[f"{k} {a}" for k, a in zip(keys, arrows)], delta_m_label(results), "Δp% ↑",
            *([] if one_task else ["mean rank ↓"]), "time × ew"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    std = results.get("baseline_std", {})
    base = ["single-task",
            *[cell({"mean": results["baseline"][k], "std": std.get(k, 0.0)}, 4) for k in keys],
            "0.00", "0.00", *([] if one_task else [""]), ""]
    lines.append("| " + " | ".join(base) + " |")
    for m in method_order(results):
        row = results["methods"][m]
        name = m + (f" {IMPROVING}" if any(row.get("still_improving", [])) else "")
        cells = [name, *[cell(row["metrics"][k], 4) for k in keys], cell(_dm(row, dm_key), 2),
                 cell(row.get("delta_p", {"mean": math.nan}), 2),
                 *([] if one_task else [f"{row['mean_rank']:.2f}"]), f"{row['time_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *table_notes(results)])


def write_results_csv(results: Mapping[str, Any], path: Path) -> None:
    keys = results["metrics"]
    cols = ["method", *[f"{k}_{s}" for k in keys for s in ("mean", "std")],
            "delta_m_mean", "delta_m_std", "delta_m_per_task_mean", "delta_m_per_task_std",
            "delta_p_mean", "delta_p_std", "mean_rank",
            "time_ratio", "still_improving_seeds"]
    rows = [",".join(cols)]
    for m, row in results["methods"].items():
        vals = [m]
        for k in keys:
            vals += [repr(row["metrics"][k]["mean"]), repr(row["metrics"][k]["std"])]
        per_task = _dm(row, "delta_m_per_task")
        vals += [repr(row["delta_m"]["mean"]), repr(row["delta_m"]["std"]),
                 repr(per_task["mean"]), repr(per_task["std"]),
                 repr(row["delta_p"]["mean"]), repr(row["delta_p"]["std"]),
                 repr(row["mean_rank"]), repr(row["time_ratio"]),
                 str(sum(row["still_improving"]))]
        rows.append(",".join(vals))
    path.write_text("\n".join(rows) + "\n")


