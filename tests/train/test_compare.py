"""`mtlkit compare / train / report` end to end on a reduced budget, and config errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtlkit import cli
from mtlkit.metrics import delta_m
from mtlkit.train import load_checkpoint
from mtlkit.train.compare import format_table

PLOTS = ("delta_m.png", "weights.png", "val_curves.png", "cosine.png")
TINY = {"dataset_options": {"size": 160}, "epochs": 2, "batch_size": 32}


def _config(tmp_path: Path, **fields) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "out"), **fields}))
    return str(path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, str]:
    """One small comparison (two seeds, a loss and a gradient method) shared by the tests."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = _config(tmp, methods=["uw", "mgda"], seeds=2)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["compare", "--config", cfg]) == 0
    return tmp / "out", buf.getvalue()


def test_compare_writes_every_report_file(compared) -> None:
    out, _ = compared
    for name in ("report.md", "report.html", "results.json", "results.csv", *PLOTS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "report.md").read_text()


def test_printed_table_and_csv_hold_the_values_of_results_json(compared) -> None:
    out, printed = compared
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"ew", "uw", "mgda"}  # ew added as the time reference
    assert results["tasks"] == ["left", "right", "sum"]
    # a name carries " ↗" when a seed was still improving at its last epoch
    rows = {r.split("|")[1].strip().removesuffix(" ↗"):
            [c.strip() for c in r.strip().strip("|").split("|")]
            for r in printed.splitlines() if r.startswith("| ") and "---" not in r}
    keys = results["metrics"]
    for m, row in results["methods"].items():
        cells = rows[m]
        for k, cell in zip(keys, cells[1:]):
            mean, std = (float(v) for v in cell.split(" ± "))
            assert mean == pytest.approx(row["metrics"][k]["mean"], abs=5e-5)
            assert std == pytest.approx(row["metrics"][k]["std"], abs=5e-5)
        dm_mean = float(cells[1 + len(keys)].split(" ± ")[0])
        assert dm_mean == pytest.approx(row["delta_m"]["mean"], abs=5e-3)
        dp_mean = float(cells[2 + len(keys)].split(" ± ")[0])
        assert dp_mean == pytest.approx(row["delta_p"]["mean"], abs=5e-3)
        assert cells[0].endswith(" ↗") == any(row["still_improving"])
        assert float(cells[-1]) == pytest.approx(row["time_ratio"], abs=5e-3)
    with (out / "results.csv").open() as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    for m, row in results["methods"].items():
        assert float(csv_rows[m]["delta_m_mean"]) == row["delta_m"]["mean"]
        assert float(csv_rows[m]["mean_rank"]) == row["mean_rank"]
    assert results["methods"]["ew"]["time_ratio"] == 1.0


def test_delta_m_and_seeds_are_recomputed_from_the_runs(compared) -> None:
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    keys, higher = results["metrics"], results["higher_is_better"]
    baseline = {
        k: float(np.mean([r["test"][k] for r in results["runs"][f"single:{k.split('/')[0]}"]]))
        for k in keys
    }
    assert baseline == pytest.approx(results["baseline"])
    for m, row in results["methods"].items():
        runs = results["runs"][m]
        assert len(runs) == 2 and row["delta_m"]["n"] == 2
        dms = [delta_m({k: r["test"][k] for k in keys}, baseline, higher) for r in runs]
        assert row["delta_m"]["mean"] == pytest.approx(np.mean(dms))
        assert row["delta_m"]["std"] == pytest.approx(np.std(dms, ddof=1))
        for k in keys:  # each seed is its own run: the two seeds differ
            assert row["metrics"][k]["n"] == 2
    a, b = results["runs"]["uw"]
    assert a["history"] != b["history"]


def test_report_is_rebuilt_from_the_files(compared, capsys) -> None:
    out, _ = compared
    before = (out / "report.md").read_text()
    for name in ("report.md", "report.html", *PLOTS):
        (out / name).unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == before
    assert all((out / n).is_file() for n in PLOTS)
    table = format_table(json.loads((out / "results.json").read_text()))
    assert table in capsys.readouterr().out


def test_train_runs_one_method_and_resumes_exactly(tmp_path, capsys) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    # A step schedule: the default cosine's length is the budget, which --epochs 1 changes
    base = ["train", "--method", "dwa", "--config", _config(tmp_path),
            "--set", "scheduler={name: step, step_size: 1, gamma: 0.5}"]
    assert cli.main([*base, "--out", str(full)]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--out", str(part), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--out", str(part), "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed == ref
    assert (part / "steps.jsonl").read_text() == (full / "steps.jsonl").read_text()


def test_max_steps_stops_mid_epoch(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    assert cli.main(["train", "--method", "ew", "--config", _config(tmp_path, epochs=5),
                     "--max-steps", "7", "--out", str(out)]) == 0
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    # 112 training samples at batch 32: 3 full steps per epoch, so step 7 ends inside epoch 3
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == 7
    assert [e["epoch"] for e in epochs] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "fields", "message"),
    [
        (["--methods", "ew,nope"], {}, r"methods: unknown method 'nope'"),
        (["--task-lr", "nope=0.1"], {}, r"task_lr: unknown task\(s\) \['nope'\]"),
        (["--lr", "-1"], {}, r"lr must be a positive number"),
        (["--dataset", "nyuv2"], {"dataset_options": {}}, r"nyuv2 is read from disk: pass root="),
        (["--root", "/no/such/dir"], {"dataset": "nyuv2", "dataset_options": {}},
         r"data folder /no/such/dir"),
        ([], {"epoch": 3}, r"config: unknown field\(s\) \['epoch'\]"),
        ([], {"seeds": 0}, r"seeds must be a count >= 1 or a list"),
        ([], {"hparams": {"uw": {"nope": 1}}, "methods": ["uw"]}, r"uw: unknown hyperparameter"),
        ([], {"hparams": {"dwa": {"temperature": -1}}, "methods": ["dwa"]}, r"temperature"),
        ([], {"dataset_options": {"sizes": 3}}, r"unknown option\(s\) \['sizes'\]"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, args, fields, message) -> None:
    code = cli.main(["compare", "--config", _config(tmp_path, **fields), *args])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE
    assert len(err.splitlines()) == 1 and err.startswith("mtlkit: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "results.json").exists()


def test_malformed_or_missing_config_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [ew\n")
    assert cli.main(["compare", "--config", str(bad)]) == cli.EXIT_USAGE
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["compare", "--config", str(tmp_path / "none.yaml")]) == cli.EXIT_USAGE
    assert "config: no file" in capsys.readouterr().err


def _write_nyuv2(root: Path, n: int, h: int, w: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 4)):
        for kind, shape in (("image", (h, w, 3)), ("label", (h, w)), ("depth", (h, w, 1)),
                            ("normal", (h, w, 3))):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                value = rng.random(shape).astype(np.float32)
                if kind == "label":
                    value = rng.integers(0, 13, shape).astype(np.float32)
                np.save(root / split / kind / f"{i}.npy", value)


@pytest.mark.slow
def test_compare_runs_on_dense_tasks_from_disk(tmp_path, capsys) -> None:
    root = tmp_path / "nyu"
    _write_nyuv2(root, 12, 16, 16)
    # The normal task's baseline is given, with a zero metric: Δm cannot divide by it.
    given = {"normal/mean_angle": 45.0, "normal/median_angle": 44.0, "normal/within_11.25": 0.0,
             "normal/within_22.5": 0.1, "normal/within_30": 0.2}
    cfg = _config(tmp_path, dataset="nyuv2", root=str(root), methods=["ew", "mgda"],
                  dataset_options={}, epochs=1, batch_size=4, baselines=given)
    assert cli.main(["compare", "--config", cfg]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"] == ["seg", "depth", "normal"]
    assert {"seg/miou", "depth/abs_err", "normal/mean_angle"} <= set(results["metrics"])
    assert results["baseline"]["normal/within_11.25"] == 0.0
    assert "normal/within_11.25" in results["delta_m_excluded"]
    assert "normal/within_11.25" not in results["delta_m_metrics"]
    assert "normal/mean_angle" in results["delta_m_metrics"]
    assert "leave out normal/within_11.25" in (tmp_path / "out" / "report.md").read_text()


def test_an_interrupted_compare_resumes_without_retraining_finished_runs(tmp_path, monkeypatch,
                                                                         capsys) -> None:
    from mtlkit.train import trainer as trainer_module

    cfg = _config(tmp_path, methods=["ew", "dwa"], epochs=1)
    real_epoch = trainer_module.Trainer._train_epoch
    calls = {"n": 0}

    def crash_on_the_fourth_run(self, loader):  # runs: 3 baselines, then ew, then dwa
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_epoch(self, loader)

    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch", crash_on_the_fourth_run)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["compare", "--config", cfg])
    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch", real_epoch)
    out = tmp_path / "out"
    done = {p: p.read_text() for p in (out / "runs").glob("single-*/seed0/steps.jsonl")}
    assert len(done) == 3 and not (out / "results.json").exists()

    trained = []
    monkeypatch.setattr(trainer_module.Trainer, "_train_epoch",
                        lambda self, loader: (trained.append(str(self.balancer)),
                                              real_epoch(self, loader))[1])
    assert cli.main(["compare", "--config", cfg, "--resume"]) == 0
    assert trained == ["ew", "dwa"]  # the finished baselines were not trained again
    assert {p: p.read_text() for p in done} == done
    resumed = json.loads((out / "results.json").read_text())
    capsys.readouterr()

    assert cli.main(["compare", "--config", cfg, "--out", str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    for m in ("ew", "dwa"):  # the same numbers as an uninterrupted comparison
        assert resumed["methods"][m]["metrics"] == fresh["methods"][m]["metrics"]
        assert resumed["methods"][m]["delta_m"] == fresh["methods"][m]["delta_m"]


def test_a_fresh_run_into_a_used_folder_starts_fresh_logs(tmp_path, capsys) -> None:
    base = ["train", "--method", "ew", "--config", _config(tmp_path), "--out", str(tmp_path / "o")]
    assert cli.main(base) == 0
    first = (tmp_path / "o" / "steps.jsonl").read_text()
    assert cli.main(base) == 0
    assert (tmp_path / "o" / "steps.jsonl").read_text() == first


def test_parallel_runs_give_the_results_of_sequential_runs(tmp_path, capsys) -> None:
    """jobs=2 trains the runs in two worker processes; every metric equals the one-process
    comparison's (the step-time ratios are measurements, so they may differ)."""
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        cfg = _config(tmp_path, methods=["ew", "mgda"], seeds=2, jobs=jobs, threads=1,
                      out=str(out))
        assert cli.main(["compare", "--config", cfg]) == 0
        results[jobs] = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().err
    assert "10 runs, 2 at a time, 1 torch thread(s) each" in printed
    assert "[10/10]" in printed
    for m in ("ew", "mgda"):
        one, two = results[1]["methods"][m], results[2]["methods"][m]
        assert one["metrics"] == two["metrics"] and one["delta_m"] == two["delta_m"]
    assert results[1]["baseline"] == results[2]["baseline"]


@pytest.mark.parametrize(("field", "value"), [("jobs", 0), ("threads", "many")])
def test_jobs_and_threads_are_checked(tmp_path, capsys, field, value) -> None:
    assert cli.main(["compare", "--config", _config(tmp_path, **{field: value})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{field} must be an integer >= 1 or auto" in err


def test_auto_parallelism_is_one_process_per_core_on_cpu(monkeypatch) -> None:
    from mtlkit.experiment import Experiment

    monkeypatch.setattr("mtlkit.experiment._cores", lambda: 4)
    assert Experiment().parallelism(13) == (4, 1)
    assert Experiment().parallelism(2) == (2, 2)
    assert Experiment(jobs=1).parallelism(13) == (1, 4)
    assert Experiment(threads=3).parallelism(13) == (4, 3)


def test_a_failing_run_in_a_worker_is_one_line_and_stops_the_others(tmp_path, capsys) -> None:
    # A learning rate that makes the losses overflow: the first run to fail ends the comparison
    cfg = _config(tmp_path, methods=["ew", "mgda"], jobs=2, threads=1, epochs=3,
                  optimizer={"name": "sgd", "lr": 1e30})
    assert cli.main(["compare", "--config", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mtlkit: error: ") and "non-finite" in err[-1], err[-1]
    assert not (tmp_path / "out" / "results.json").exists()


def test_train_runs_with_the_threads_it_is_given(tmp_path, monkeypatch, capsys) -> None:
    from mtlkit.train import trainer as trainer_module

    seen = []
    real = trainer_module.Trainer.fit
    monkeypatch.setattr(trainer_module.Trainer, "fit",
                        lambda self, *a, **k: (seen.append(torch.get_num_threads()),
                                               real(self, *a, **k))[1])
    before = torch.get_num_threads()
    assert cli.main(["train", "--method", "ew", "--config", _config(tmp_path, threads=1),
                     "--set", "epochs=1"]) == 0
    assert seen == [1] and torch.get_num_threads() == before
