"""Results and report pieces from hand-made runs (no training): Δm% and Δp per method, given
baselines, the still-improving flag, the single-task message, and what report.html carries."""

from __future__ import annotations

import csv
import json
import re

import pytest

from mtlkit.tasks import Task
from mtlkit.train.compare import format_table, summarise, versions, write_results_csv
from mtlkit.train.report import write_report

CLS = Task.classification("c", 3)  # metrics accuracy, f1 (higher is better)
REG = Task.regression("r")  # metrics mae, rmse (lower is better)


def _run(c_acc, c_f1, r_mae, r_rmse, improving=False, time=1.0):
    test = {"c/accuracy": c_acc, "c/f1": c_f1, "r/mae": r_mae, "r/rmse": r_rmse}
    return {"test": test, "step_time": time, "selected_epoch": 2, "still_improving": improving,
            "history": [{"epoch": 1}, {"epoch": 2}]}


RUNS = {
    "single:c": [_run(0.8, 0.5, 0, 0), _run(0.6, 0.5, 0, 0)],  # seed means 0.7, 0.5
    "single:r": [_run(0, 0, 1.0, 2.0), _run(0, 0, 3.0, 2.0)],  # seed means 2.0, 2.0
    "ew": [_run(0.7, 0.5, 2.0, 2.0), _run(0.7, 0.5, 2.0, 2.0)],  # equal to the baselines
    "a": [_run(0.77, 0.6, 2.0, 1.0), _run(0.77, 0.6, 2.0, 1.0, improving=True, time=3.0)],
    "b": [_run(0.77, 0.6, 2.0, 1.0), _run(0.77, 0.6, 2.0, 1.0)],  # ties a on every metric
}


def test_delta_m_delta_p_and_ranks_by_hand():
    res = summarise(RUNS, [CLS, REG], ["ew", "a", "b"])
    # a: acc +10%, f1 +20%, mae 0%, rmse -50% error (better): +50% ->
    #   Δm% = (10 + 20 + 0 + 50) / 4 = 20; Δp = ((10 + 20) / 2 + (0 + 50) / 2) / 2 = 20
    assert res["methods"]["a"]["delta_m"]["mean"] == pytest.approx(20.0)
    assert res["methods"]["a"]["delta_p"]["mean"] == pytest.approx(20.0)
    assert res["methods"]["ew"]["delta_m"] == {"mean": 0.0, "std": 0.0, "n": 2}
    # a and b tie on every metric (1.5 each), except mae where all three tie (2 each); ew is
    # third elsewhere: a = (1.5 + 1.5 + 2 + 1.5) / 4, ew = (3 + 3 + 2 + 3) / 4
    assert res["methods"]["a"]["mean_rank"] == res["methods"]["b"]["mean_rank"] == 1.625
    assert res["methods"]["ew"]["mean_rank"] == 2.75
    assert res["baseline_std"]["c/accuracy"] == pytest.approx(0.1414214)  # stdev(0.8, 0.6)
    assert res["methods"]["a"]["still_improving"] == [False, True]
    assert res["methods"]["a"]["time_ratio"] == 2.0 and res["order_by"] == "delta_m"


def test_delta_p_differs_from_delta_m_when_tasks_have_different_metric_counts():
    from _fakes import RegressionTask  # one metric: mae

    # c keeps accuracy and f1, r only mae. a: acc +10, f1 +20, mae 0 ->
    # Δm% = (10 + 20 + 0) / 3 = 10; Δp = ((10 + 20) / 2 + 0) / 2 = 7.5
    res = summarise(RUNS, [CLS, RegressionTask("r")], ["ew", "a"])
    assert res["metrics"] == ["c/accuracy", "c/f1", "r/mae"]
    assert res["methods"]["a"]["delta_m"]["mean"] == pytest.approx(10.0)
    assert res["methods"]["a"]["delta_p"]["mean"] == pytest.approx(7.5)


def test_given_baselines_replace_training_for_their_tasks():
    runs = {k: v for k, v in RUNS.items() if k != "single:r"}
    res = summarise(runs, [CLS, REG], ["ew", "a"], {"r/mae": 4.0})
    # r/rmse has no given value: it leaves Δ; r/mae: a 2.0 vs 4.0 -> +50%
    assert res["delta_m_excluded"] == ["r/rmse"]
    assert res["methods"]["a"]["delta_m"]["mean"] == pytest.approx((10 + 20 + 50) / 3)
    table = format_table(res)
    assert "given in the config" in table and "r/mae" in table.split("given")[0].splitlines()[-1]
    with pytest.raises(ValueError, match=r"baselines: unknown metric\(s\) \['r/miou'\]"):
        summarise(runs, [CLS, REG], ["ew", "a"], {"r/miou": 0.5})


def test_a_single_task_comparison_says_so_and_ranks_nothing():
    runs = {"single:c": RUNS["single:c"],
            **{m: [{**r, "test": {k: v for k, v in r["test"].items() if k.startswith("c/")}}
                   for r in RUNS[m]] for m in ("ew", "a")}}
    res = summarise(runs, [CLS], ["ew", "a"])
    assert res["single_task"] and res["order_by"] is None
    table = format_table(res)
    assert "One task only (c)" in table and "mean rank" not in table
    assert "ordered by" not in table


@pytest.fixture
def report(tmp_path):
    res = summarise(RUNS, [CLS, REG], ["ew", "a", "b"])
    res["config"] = {"dataset": "toy", "optimizer": {"name": "adam", "lr": 0.003},
                     "scheduler": {"name": "cosine"}, "hparams": {"a": {"alpha": 1.5}},
                     "seeds": 2, "patience": 3}
    res["versions"] = versions()
    (tmp_path / "results.json").write_text(json.dumps(res))
    write_report(tmp_path)
    return tmp_path, (tmp_path / "report.html").read_text()


def test_report_html_carries_config_versions_bold_best_and_std(report):
    out, page = report
    import torch

    import mtlkit

    for text in ("adam", "0.003", "cosine", "alpha", "patience", f"mtlkit {mtlkit.__version__}",
                 f"torch {torch.__version__}", "Δp", "LibMTL", "Maninis", "ordered by Δm%"):
        assert text in page, text
    # bold: a and b share the best accuracy 0.7700 and Δm% 20.00; ew has the lowest time
    assert page.count("<b>0.7700</b>") == 2 and page.count("<b>20.00</b>") == 4  # Δm%, Δp
    assert "<b>1.00</b>" in page and "<b>0.7000</b>" not in page
    # every row has ± std, the single-task row too (0.1414 = stdev of 0.8 and 0.6)
    baseline_row = re.search(r"<tr class='baseline'>(.*?)</tr>", page).group(1)
    assert "± 0.1414" in baseline_row
    assert page.count("± ") >= 4 * (3 + 1)
    assert "a ↗" in page and "still improving" in page
    md = (out / "report.md").read_text()
    for name in ("delta_m.png", "val_curves.png", "train_loss.png", "weights.png", "cosine.png"):
        assert (out / name).is_file() and f"]({name})" in md and f"src='{name}'" in page


def _survey_runs():
    one = {"single:c": [_run(0.5, 0.5, 0, 0)], "single:r": [_run(0, 0, 2.0, 2.0)],
           "ew": [_run(0.5, 0.5, 2.0, 2.0)],
           "x": [_run(0.6, 0.3, 1.6, 2.6)],     # acc +20, f1 -40, mae +20, rmse -30 (%)
           "y": [_run(0.55, 0.6, 2.0, 1.6)]}    # acc +10, f1 +20, mae 0, rmse +20 (%)
    return one


def test_per_task_delta_m_uses_each_task_primary_metric_and_orders_the_table(tmp_path):
    from mtlkit.data._dense_tasks import survey_delta_m
    from mtlkit.train.compare import definitions, method_order

    res = summarise(_survey_runs(), [CLS, REG], ["ew", "x", "y"])
    x, y = res["methods"]["x"], res["methods"]["y"]
    # every metric: x (20 - 40 + 20 - 30) / 4 = -7.5, y (10 + 20 + 0 + 20) / 4 = 12.5
    assert x["delta_m"]["mean"] == pytest.approx(-7.5)
    assert y["delta_m"]["mean"] == pytest.approx(12.5)
    # one primary metric per task (c/accuracy, r/mae): x (20 + 20) / 2 = 20, y (10 + 0) / 2 = 5
    assert res["delta_m_per_task_metrics"] == ["c/accuracy", "r/mae"]
    assert x["delta_m_per_task"]["mean"] == pytest.approx(20.0)
    assert y["delta_m_per_task"]["mean"] == pytest.approx(5.0)
    assert survey_delta_m(_survey_runs()["x"][0]["test"], {
        "c/accuracy": 0.5, "r/mae": 2.0}, [CLS, REG]) == pytest.approx(20.0)
    # the config's delta_m picks the one that orders and fills the table
    assert method_order(res) == ["y", "ew", "x"]
    assert "over every metric" in format_table(res) and "Δm% ↑" in format_table(res)
    res["config"] = {"dataset": "toy", "delta_m": "per_task"}
    assert method_order(res) == ["x", "y", "ew"]
    table = format_table(res)
    assert "| Δm% per task ↑ |" in table and "the survey's definition" in table
    assert table.splitlines()[3].split("|")[6].strip() == "20.00"  # x's row, Δm column
    assert "one primary metric" in definitions(res) and "c/accuracy, r/mae" in definitions(res)
    (tmp_path / "results.json").write_text(json.dumps(res))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "dense-prediction survey's" in md and "Eq. 10" in md
    assert "Δm% per task" in (tmp_path / "report.html").read_text()
    write_results_csv(res, tmp_path / "results.csv")
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert float(rows["x"]["delta_m_per_task_mean"]) == pytest.approx(20.0)
    assert float(rows["x"]["delta_m_mean"]) == pytest.approx(-7.5)
    res["config"]["delta_m"] = "primary"
    with pytest.raises(ValueError, match="config.delta_m must be one of"):
        method_order(res)


def test_experiment_delta_m_field_is_checked():
    from mtlkit.experiment import Experiment

    assert Experiment().delta_m == "all_metrics"
    assert Experiment.from_dict({"delta_m": "per_task"}).delta_m == "per_task"
    with pytest.raises(ValueError, match=r"delta_m must be one of \['all_metrics', 'per_task'\]"):
        Experiment.from_dict({"delta_m": "survey"})
