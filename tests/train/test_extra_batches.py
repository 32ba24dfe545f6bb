"""The trainer draws a second batch (MoDo, SDMGrad) or a held-out batch (Auto-Lambda) for the
balancers that declare they need one, end to end through `mtlkit compare` / `mtlkit train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mtlkit import balancers, cli

TINY = {"dataset_options": {"size": 160}, "epochs": 2, "batch_size": 32}


def _config(tmp_path: Path, **fields) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "out"), **fields}))
    return str(path)


@pytest.mark.parametrize(("method", "start"), [("modo", 1 / 3), ("auto_lambda", 0.1)])
def test_train_runs_methods_that_need_a_second_or_held_out_batch(tmp_path, capsys, method,
                                                                  start) -> None:
    out = tmp_path / "out"
    assert cli.main(["train", "--method", method, "--config", _config(tmp_path),
                     "--out", str(out), "--max-steps", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == method
    last = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()][-1]
    # The weights moved away from their initial values: the extra batch reached the balancer.
    assert any(abs(w - start) > 1e-6 for w in last["weight"].values()), last


def test_second_batch_run_resumes_exactly(tmp_path, capsys) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    # A step schedule: the default cosine's length is the budget, which --epochs 1 changes
    base = ["train", "--method", "sdmgrad", "--config", _config(tmp_path),
            "--set", "scheduler={name: step, step_size: 1, gamma: 0.5}"]
    assert cli.main([*base, "--out", str(full)]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--out", str(part), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--out", str(part), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out) == ref
    assert (part / "steps.jsonl").read_text() == (full / "steps.jsonl").read_text()


def test_the_trainer_reads_class_attributes_not_names() -> None:
    needs = {n for n in balancers.available()
             if getattr(balancers.get(n), "needs_second_batch", False)}
    held = {n for n in balancers.available()
            if getattr(balancers.get(n), "needs_held_out_batch", False)}
    assert needs == {"modo", "sdmgrad"} and held == {"auto_lambda"}


def test_held_out_pass_leaves_batch_norm_statistics_alone():
    from _fakes import RegressionTask, TinyModel, TwoTaskData
    from torch import nn
    from torch.utils.data import DataLoader

    from mtlkit.train import TrainConfig, Trainer

    model = TinyModel()
    model.trunk = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh())
    trainer = Trainer(model, [RegressionTask("a"), RegressionTask("b")],
                      balancers.create("auto_lambda", tasks=["a", "b"]),
                      TrainConfig(epochs=1, batch_size=16), None)
    data = TwoTaskData(32, 0)
    ctx = trainer._extra_context(next(iter(DataLoader(data, batch_size=16))))
    assert ctx["parameters"] == list(model.parameters())
    before = [b.clone() for b in model.buffers()]
    losses = ctx["held_out"]()
    assert set(losses) == {"a", "b"} and all(v.requires_grad for v in losses.values())
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), before))
    model(data.x[:16])  # a plain training-mode forward does move them
    assert not all(torch.equal(b, s) for b, s in zip(model.buffers(), before))
