"""Reports of a comparison: Markdown and HTML, with plots, built from ``results.json`` and logs.

``mtlkit report DIR`` rebuilds everything here from the files a ``compare`` run left in DIR.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt

from mtlkit.train.compare import format_table, run_dir
from mtlkit.train.logs import EPOCHS, STEPS, read_jsonl

PLOTS = {
    "delta_m.png": "Δm% against the single-task baselines (mean ± std over seeds)",
    "weights.png": "Effective task weights over training (seed 0)",
    "val_curves.png": "Primary validation metric per task over epochs (seed 0)",
    "cosine.png": "Cosine similarity of the task gradients w.r.t. the shared parameters (seed 0)",
}


def write_report(out_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``out_dir``; returns the
    Markdown path. Needs ``results.json`` there (from ``mtlkit compare``)."""
    out = Path(out_dir)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `mtlkit compare --out {out}` first")
    results = json.loads(path.read_text())
    methods = list(results["methods"])
    _plot_delta_m(results, out / "delta_m.png")
    _plot_weights(out, methods, results["tasks"], out / "weights.png")
    _plot_val_curves(out, methods, results["primary"], results["higher_is_better"],
                     out / "val_curves.png")
    _plot_cosine(out, methods, out / "cosine.png")

    cfg = results.get("config", {})
    table = format_table(results)
    md = [
        f"# mtlkit compare: {cfg.get('dataset', '?')}",
        "",
        (f"Tasks: {', '.join(results['tasks'])}. Seeds: {cfg.get('seeds', 1)}. "
         f"Epochs: {cfg.get('epochs', '?')}. Created {results.get('created', '')}."),
        "",
        ("Test metrics at the epoch selected on the validation split; Δm% is the mean relative "
         "gain over every metric against single-task baselines (Maninis et al. 2019; positive "
         "is better); mean rank averages each method's rank over the metrics; `time × ew` is "
         "the median training step time divided by the plain sum's."),
        "",
        table,
        "",
    ]
    if results.get("delta_m_excluded"):
        md[-1:-1] = ["", (f"Δm leaves out {', '.join(results['delta_m_excluded'])}: the "
                          "single-task baseline is 0 or undefined there, so no relative change "
                          "exists.")]
    for name, caption in PLOTS.items():
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    (out / "report.html").write_text(_html(cfg.get("dataset", "?"), table))
    return md_path


def _runs(out: Path, method: str, name: str) -> list[dict[str, Any]]:
    return read_jsonl(run_dir(out, method, 0) / name)


def _marker(points: list[Any]) -> str | None:
    """Dots on short curves, so that a run with one logged point still shows it."""
    return "." if len(points) < 20 else None


def _grid(n: int) -> tuple[Any, list[Any]]:
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _plot_delta_m(results: Mapping[str, Any], path: Path) -> None:
    rows = sorted(results["methods"].items(), key=lambda kv: -kv[1]["delta_m"]["mean"])
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(rows), 3.2))
    means = [r["delta_m"]["mean"] for _, r in rows]
    colors = ["tab:green" if v > 0 else "tab:red" for v in means]
    ax.bar([m for m, _ in rows], means, yerr=[r["delta_m"]["std"] for _, r in rows],
           color=colors, capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("Δm %")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_weights(out: Path, methods: list[str], tasks: list[str], path: Path) -> None:
    fig, axes = _grid(len(methods))
    for ax, m in zip(axes, methods):
        steps = _runs(out, m, STEPS)
        for t in tasks:
            ax.plot([r["step"] for r in steps], [r["weight"][t] for r in steps], label=t,
                    marker=_marker(steps))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_val_curves(out: Path, methods: list[str], primary: Mapping[str, str],
                     higher: Mapping[str, bool], path: Path) -> None:
    fig, axes = _grid(len(primary))
    for ax, (task, key) in zip(axes, primary.items()):
        for m in methods:
            epochs = _runs(out, m, EPOCHS)
            ax.plot([r["epoch"] for r in epochs], [r["val"][key] for r in epochs], label=m,
                    marker=_marker(epochs))
        single = read_jsonl(run_dir(out, f"single:{task}", 0) / EPOCHS)
        ax.plot([r["epoch"] for r in single], [r["val"][key] for r in single], "k--",
                label="single-task")
        ax.set_title(f"{key} {'↑' if higher[key] else '↓'}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_cosine(out: Path, methods: list[str], path: Path) -> None:
    fig, axes = _grid(len(methods))
    for ax, m in zip(axes, methods):
        steps = [r for r in _runs(out, m, STEPS) if "cosine" in r]
        pairs = list(steps[0]["cosine"]) if steps else []
        for pair in pairs:
            ax.plot([r["step"] for r in steps], [r["cosine"][pair] for r in steps], label=pair,
                    marker=_marker(steps))
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(m, fontsize=9)
    if axes:
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _html(dataset: str, table: str) -> str:
    lines = [r for r in table.splitlines() if not r.startswith("|---")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:]
    )
    figs = "".join(
        f"<h2>{html.escape(cap)}</h2><img src='{name}' alt='{html.escape(cap)}'>"
        for name, cap in PLOTS.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>mtlkit compare: {html.escape(dataset)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
        "</style></head><body>"
        f"<h1>mtlkit compare: {html.escape(dataset)}</h1><table><tr>{head}</tr>{body}</table>"
        f"{figs}</body></html>"
    )
