"""Reports of a comparison: Markdown and HTML, with plots, built from ``results.json`` and logs.

``mtlkit report DIR`` rebuilds everything here from the files a ``compare`` run left in DIR.
``report.html`` holds everything ``report.md`` has, plus the full configuration and the
versions the results were obtained with.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from mtlkit.train.compare import (
    IMPROVING,
    definitions,
    delta_m_key,
    delta_m_label,
    format_table,
    method_order,
    run_dir,
    table_notes,
)
from mtlkit.train.logs import EPOCHS, STEPS, read_jsonl

PLOTS = {
    "delta_m.png": "Δm% and Δp against the single-task baselines (mean ± std over seeds)",
    "val_curves.png": "Primary validation metric per task over epochs (mean ± std over seeds)",
    "train_loss.png": "Training loss per task over epochs (mean ± std over seeds)",
    "weights.png": "Effective task weights over training (mean ± std over seeds)",
    "cosine.png": "Cosine similarity of the task gradients w.r.t. the shared parameters (seed 0)",
}
#: Line styles and markers cycled with the colours, so overlapping curves stay distinguishable.
STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")


def write_report(out_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``out_dir``; returns the
    Markdown path. Needs ``results.json`` there (from ``mtlkit compare``)."""
    out = Path(out_dir)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `mtlkit compare --out {out}` first")
    results = json.loads(path.read_text())
    methods = method_order(results)
    seeds = max(v["delta_m"]["n"] for v in results["methods"].values())
    _plot_delta_m(results, methods, out / "delta_m.png")
    _plot_val_curves(out, results, methods, seeds, out / "val_curves.png")
    _plot_train_loss(out, results["tasks"], methods, seeds, out / "train_loss.png")
    _plot_weights(out, methods, results["tasks"], seeds, out / "weights.png")
    _plot_cosine(out, methods, out / "cosine.png")

    cfg = results.get("config", {})
    intro = _intro(results)
    md = [f"# mtlkit compare: {cfg.get('dataset', '?')}", "", intro, "", definitions(results),
          "", format_table(results), ""]
    if _excluded(results):
        md += [_excluded(results), ""]
    for name, caption in PLOTS.items():
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    (out / "report.html").write_text(_html(results, intro))
    return md_path


def _intro(results: Mapping[str, Any]) -> str:
    cfg = results.get("config", {})
    budget = f"{cfg.get('epochs', '?')} epochs at most"
    if cfg.get("max_steps"):
        budget += f" or {cfg['max_steps']} steps"
    if cfg.get("patience"):
        gain = (f" (a mean relative gain above {cfg['min_delta']:g})"
                if cfg.get("min_delta") else "")
        budget += (f", early stopping after {cfg['patience']} epochs without a better "
                   f"validation score{gain}")
    sched = cfg.get("scheduler") or {}
    if sched.get("name", "none") != "none":
        budget += f", {sched['name']} learning-rate schedule"
    return (f"Tasks: {', '.join(results['tasks'])}. Seeds: {cfg.get('seeds', 1)}. "
            f"Budget: {budget}. Created {results.get('created', '')}. Test metrics at the epoch "
            "selected on the validation split (never test).")


def _excluded(results: Mapping[str, Any]) -> str:
    """A note naming the metrics Δm% leaves out (no usable baseline), or ``""``."""
    left = list(results.get("delta_m_excluded", []))
    if delta_m_key(results) == "delta_m_per_task":
        left = list(results.get("delta_m_per_task_excluded", []))
    if not left:
        return ""
    return (f"Δm% and Δp leave out {', '.join(left)}: the single-task "
            "baseline is 0, undefined or not given there, so no relative change exists.")


# ---------------------------------------------------------------- plots
def _style(i: int) -> dict[str, Any]:
    """Colour, line style and marker of the i-th curve: no two of the first 40 share all three."""
    return {"color": f"C{i % 10}", "linestyle": STYLES[(i // 10 + i) % len(STYLES)],
            "marker": MARKERS[i % len(MARKERS)], "markersize": 4, "linewidth": 1.4}


def _integer_epochs(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _band(ax: Any, per_seed: Sequence[Mapping[float, float]], label: str, style: Mapping[str, Any],
          every: int = 1) -> None:
    """Mean over the seeds at each x, with a ± std band where two or more seeds have a value
    (a run stopped early contributes to the epochs it trained)."""
    xs = sorted({x for run in per_seed for x in run})
    if not xs:
        return
    means, stds = [], []
    for x in xs:
        vals = [run[x] for run in per_seed if x in run and math.isfinite(run[x])]
        means.append(statistics.fmean(vals) if vals else math.nan)
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    ax.plot(xs, means, label=label, markevery=max(1, every), **style)
    if len(per_seed) > 1:
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                        [m + s for m, s in zip(means, stds)], color=style["color"], alpha=0.15,
                        linewidth=0)


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _legend_below(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for the figure, under the plots, so it never hides a curve."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
                   frameon=False)
        rows = (len(labels) + 5) // 6
        fig.tight_layout(rect=(0, 0.04 + 0.035 * rows * 3.2 / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _epochs(out: Path, key: str, seeds: int) -> list[list[dict[str, Any]]]:
    return [read_jsonl(run_dir(out, key, s) / EPOCHS) for s in range(seeds)]


def _steps(out: Path, key: str, seeds: int) -> list[list[dict[str, Any]]]:
    return [read_jsonl(run_dir(out, key, s) / STEPS) for s in range(seeds)]


def _plot_delta_m(results: Mapping[str, Any], methods: Sequence[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(methods), 3.8))
    xs = range(len(methods))
    width = 0.4
    dm_key = delta_m_key(results)
    dm_label = "Δm% per task" if dm_key == "delta_m_per_task" else "Δm%"
    for shift, key, label, hatch in ((-width / 2, dm_key, dm_label, ""),
                                     (width / 2, "delta_p", "Δp", "//")):
        rows = [results["methods"][m].get(key, {"mean": math.nan, "std": 0.0}) for m in methods]
        ax.bar([x + shift for x in xs], [r["mean"] for r in rows], width,
               yerr=[r["std"] for r in rows], capsize=3, label=label, hatch=hatch,
               color=["tab:green" if r["mean"] > 0 else "tab:red" for r in rows],
               edgecolor="black", linewidth=0.5, alpha=0.9 if key == dm_key else 0.55)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [m + (f" {IMPROVING}" if any(results["methods"][m].get(
        "still_improving", [])) else "") for m in methods], rotation=35, ha="right")
    ax.set_xlabel("method")
    ax.set_ylabel("gain over single-task (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_val_curves(out: Path, results: Mapping[str, Any], methods: Sequence[str], seeds: int,
                     path: Path) -> None:
    primary, higher = results["primary"], results["higher_is_better"]
    fig, axes = _grid(len(primary))
    for ax, (task, key) in zip(axes, primary.items()):
        for i, m in enumerate(methods):
            runs = _epochs(out, m, seeds)
            _band(ax, [{r["epoch"]: r["val"][key] for r in run} for run in runs], m, _style(i))
        single = _epochs(out, f"single:{task}", seeds)
        _band(ax, [{r["epoch"]: r["val"][key] for r in run} for run in single], "single-task",
              {"color": "black", "linestyle": "--", "marker": None, "linewidth": 1.6})
        ax.set_title(f"{task}", fontsize=10)
        ax.set_ylabel(f"validation {key.split('/', 1)[1]} {'↑' if higher[key] else '↓'}")
        _integer_epochs(ax)
    _legend_below(fig, axes)
    _save(fig, path)


def _epoch_mean_losses(steps: Sequence[Mapping[str, Any]], task: str) -> dict[float, float]:
    """Mean of the logged training losses of each epoch (every ``log_every`` steps)."""
    per_epoch: dict[float, list[float]] = {}
    for r in steps:
        per_epoch.setdefault(r["epoch"], []).append(r["loss"][task])
    return {e: statistics.fmean(v) for e, v in per_epoch.items()}


def _plot_train_loss(out: Path, tasks: Sequence[str], methods: Sequence[str], seeds: int,
                     path: Path) -> None:
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for i, m in enumerate(methods):
            _band(ax, [_epoch_mean_losses(run, task) for run in _steps(out, m, seeds)], m,
                  _style(i))
        single = _steps(out, f"single:{task}", seeds)
        _band(ax, [_epoch_mean_losses(run, task) for run in single], "single-task",
              {"color": "black", "linestyle": "--", "marker": None, "linewidth": 1.6})
        low, high = ax.get_ylim()
        log = low > 0 and high / low > 10  # losses falling by orders of magnitude
        if log:
            ax.set_yscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("training loss (epoch mean" + (", log)" if log else ")"))
        _integer_epochs(ax)
    _legend_below(fig, axes)
    _save(fig, path)


def _plot_weights(out: Path, methods: Sequence[str], tasks: Sequence[str], seeds: int,
                  path: Path) -> None:
    fig, axes = _grid(len(methods), 3.6, 2.8)
    for ax, m in zip(axes, methods):
        runs = _steps(out, m, seeds)
        for i, t in enumerate(tasks):
            curves = [{r["step"]: r["weight"][t] for r in run} for run in runs]
            n = max((len(c) for c in curves), default=1)
            _band(ax, curves, t, _style(i), every=max(1, n // 12))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("task weight")
    if axes:
        _legend_below(fig, axes)
    _save(fig, path)


def _plot_cosine(out: Path, methods: Sequence[str], path: Path) -> None:
    fig, axes = _grid(len(methods), 3.6, 2.8)
    for ax, m in zip(axes, methods):
        steps = [r for r in read_jsonl(run_dir(out, m, 0) / STEPS) if "cosine" in r]
        pairs = list(steps[0]["cosine"]) if steps else []
        for i, pair in enumerate(pairs):
            style = _style(i)
            ax.plot([r["step"] for r in steps], [r["cosine"][pair] for r in steps],
                    label=pair.replace("|", " · "), markevery=max(1, len(steps) // 12), **style)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("cosine")
    if axes:
        _legend_below(fig, axes)
    _save(fig, path)


# ---------------------------------------------------------------- HTML
def _best(values: Sequence[float], higher: bool) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if higher else min(finite)


def _cell(ms: Mapping[str, float], digits: int, bold: bool) -> str:
    if not math.isfinite(ms["mean"]):
        return "<td>—</td>"
    text = f"{ms['mean']:.{digits}f}"
    if bold:
        text = f"<b>{text}</b>"
    std = ms.get("std", math.nan)
    if math.isfinite(std) and ms.get("n", 1) > 1:
        text += f"<br><small>± {std:.{digits}f}</small>"
    elif ms.get("given"):
        text += "<br><small>given</small>"
    return f"<td>{text}</td>"


def _table_html(results: Mapping[str, Any]) -> str:
    keys = results["metrics"]
    higher = results["higher_is_better"]
    rows = results["methods"]
    methods = method_order(results)
    one_task = bool(results.get("single_task"))
    seeds = max(v["delta_m"]["n"] for v in rows.values())
    # (column name, digits, higher is better, mean-std getter)
    cols: list[tuple[str, int, bool, Any]] = [
        (f"{k} {'↑' if higher[k] else '↓'}", 4, higher[k],
         lambda row, k=k: row["metrics"][k]) for k in keys
    ]
    dm_key = delta_m_key(results)
    cols += [(delta_m_label(results), 2, True,
              lambda row: row.get(dm_key, {"mean": math.nan, "n": 1})),
             ("Δp% ↑", 2, True, lambda row: row.get("delta_p", {"mean": math.nan}))]
    if not one_task:
        cols.append(("mean rank ↓", 2, False, lambda row: {"mean": row["mean_rank"], "n": 1}))
    cols.append(("time × ew", 2, False, lambda row: {"mean": row["time_ratio"], "n": 1}))
    best = [_best([get(rows[m])["mean"] for m in methods], hib) for _, _, hib, get in cols]
    head = "".join(f"<th>{html.escape(name).replace('/', '/<wbr>')}</th>"
                   for name in ["method", *[c[0] for c in cols]])
    given = set(results.get("baseline_given", []))
    std = results.get("baseline_std", {})
    base = ["<td class='name'>single-task</td>"]
    for k in keys:
        base.append(_cell({"mean": results["baseline"][k], "std": std.get(k, math.nan),
                           "n": seeds, "given": k in given}, 4, False))
    base += ["<td>0.00</td>", "<td>0.00</td>", *([] if one_task else ["<td></td>"]),
             "<td></td>"]
    body = [f"<tr class='baseline'>{''.join(base)}</tr>"]
    for m in methods:
        row = rows[m]
        flag = f" {IMPROVING}" if any(row.get("still_improving", [])) else ""
        cells = [f"<td class='name'>{html.escape(m + flag)}</td>"]
        for (_, digits, _, get), b in zip(cols, best):
            ms = get(row)
            cells.append(_cell(ms, digits, b is not None and ms["mean"] == b))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _config_html(results: Mapping[str, Any]) -> str:
    cfg = results.get("config", {})
    items = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
        for k, v in cfg.items()
    )
    vers = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()) or "not recorded"
    return (f"<h2>Configuration</h2><table class='config'>{items}</table>"
            f"<p>Versions: {html.escape(vers)}.</p>")


def _html(results: Mapping[str, Any], intro: str) -> str:
    dataset = str(results.get("config", {}).get("dataset", "?"))
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table_notes(results))
    if _excluded(results):
        notes += f"<p class='note'>{html.escape(_excluded(results))}</p>"
    figs = "".join(
        f"<h2>{html.escape(cap)}</h2><img src='{name}' alt='{html.escape(cap)}'>"
        for name, cap in PLOTS.items()
    )
    defs = html.escape(definitions(results)).replace("`time × ew`", "<code>time × ew</code>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>mtlkit compare: {html.escape(dataset)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1300px}"
        "table{border-collapse:collapse;font-size:13px;width:100%}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}"
        "th{background:#f3f3f3;font-weight:600}td.name{text-align:left;white-space:nowrap}"
        "tr.baseline{background:#fafafa;font-style:italic}small{color:#555}"
        "table.config{width:auto}table.config th{text-align:left}table.config td{text-align:left}"
        ".note{font-size:14px;color:#333}img{max-width:100%;display:block;margin-bottom:1em}"
        "</style></head><body>"
        f"<h1>mtlkit compare: {html.escape(dataset)}</h1><p>{html.escape(intro)}</p>"
        f"<p class='note'>{defs} Bold: the best method in each column.</p>"
        f"<div style='overflow-x:auto'>{_table_html(results)}</div>{notes}"
        f"{_config_html(results)}{figs}</body></html>"
    )
