"""Benchmark protocols end to end on tiny files: each config trains two steps; a multi-input
(Office) comparison; missing labels through every balancer."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))

from _benchmark_files import (
    write_census,
    write_cityscapes,
    write_click_log,
    write_mnist,
    write_office,
    write_qm9,
)

from mtlkit import balancers, data
from mtlkit.experiment import Experiment, read_config_file
from mtlkit.train.compare import check_methods, run_compare, train_one
from mtlkit.train.models import build_model

CONFIGS = Path(__file__).parents[2] / "configs"


def _office_home(root: Path) -> None:
    write_office(root, ("Art", "Clipart", "Product", "Real_World"), 65,
                 ((2, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1)))


PROTOCOLS = {
    # config file: (fixture writer, dataset options for the tiny files)
    "cityscapes-segnet-mtan.yaml": (write_cityscapes, {}),
    "cityscapes-libmtl.yaml": (write_cityscapes, {}),  # ResNet-50: slow
    "office31-libmtl.yaml": (write_office, {"image_size": 8}),
    "office_home-libmtl.yaml": (_office_home, {"image_size": 32}),  # as office31: slow
    "qm9-nash-mtl.yaml": (write_qm9, {"val_size": 2, "test_size": 2}),
    "multimnist-mgda.yaml": (write_mnist, {}),
    "census-mmoe.yaml": (write_census, {}),
    "tabular-esmm.yaml": (lambda root: write_click_log(root / "log.csv"),
                          {"categorical": ["user", "item"]}),
}


def test_every_benchmark_config_is_tested() -> None:
    mine = {"cityscapes", "office31", "office_home", "qm9", "multimnist", "census", "tabular"}
    names = {p.name for p in CONFIGS.glob("*.yaml")
             if read_config_file(p).get("dataset") in mine}
    assert names == set(PROTOCOLS)


@pytest.mark.parametrize("config", [
    pytest.param(c, marks=pytest.mark.slow)
    if c in ("cityscapes-libmtl.yaml", "office_home-libmtl.yaml") else c
    for c in sorted(PROTOCOLS)
])
def test_protocol_config_trains_two_steps(config: str, tmp_path: Path) -> None:
    if config.startswith("qm9"):
        pytest.importorskip("torch_geometric")
    write, options = PROTOCOLS[config]
    root = tmp_path / "data"
    root.mkdir()
    write(root)
    fields = read_config_file(CONFIGS / config)
    fields["dataset_options"] = {**fields.get("dataset_options", {}), **options}
    if fields.get("model") == "segnet_mtan":
        fields["model_options"] = {"filters": [4, 4, 8, 8, 8]}  # the paper's widths are slow
    full = Experiment.from_dict({**fields, "root": str(root)})
    bundle = full.load_data()
    check_methods(full, full.methods, bundle.task_names)  # every method builds on its tasks
    method = fields["methods"][0]
    fields.update(root=str(root), out=str(tmp_path / "run"), methods=[method],
                  hparams={k: v for k, v in fields.get("hparams", {}).items() if k == method},
                  epochs=1, max_steps=2, batch_size=2)
    cfg = Experiment.from_dict(fields)
    result = train_one(cfg)
    assert result.selected_epoch == 1
    assert len(result.history) == 1
    steps = (tmp_path / "run" / "steps.jsonl")
    assert not steps.exists() or steps.read_text().count("\n") <= 2
    for t in bundle.tasks:
        assert math.isfinite(result.test[f"{t.name}/loss"]), t.name
        assert math.isfinite(result.test[f"{t.name}/{t.primary}"]) or t.primary == "auc"


def test_office_multi_input_compare_reports_each_domain_and_delta_m(tmp_path: Path) -> None:
    write_office(tmp_path / "office", classes=1)  # every label 0: learnt in a few steps
    options = {"image_size": 8, "model": "default"}  # a small CNN: the data flow is tested
    cfg = Experiment.from_dict({
        "dataset": "office31", "root": str(tmp_path / "office"), "dataset_options": options,
        "methods": ["ew", "mgda"], "epochs": 1, "max_steps": 6, "batch_size": 2,
        "optimizer": {"lr": 0.01}, "out": str(tmp_path / "cmp"),
    })
    results = run_compare(cfg, log=lambda s: None)
    assert results["tasks"] == ["amazon", "dslr", "webcam"]
    for d in ("amazon", "dslr", "webcam"):
        assert f"{d}/accuracy" in results["metrics"]
        assert f"{d}/accuracy" in results["baseline"]
    for m in ("ew", "mgda"):
        dm = results["methods"][m]["delta_m"]["mean"]
        assert math.isfinite(dm)
        # Δm from the per-domain test metrics against the single-domain baselines
        run = results["runs"][m][0]["test"]
        keys = results["delta_m_metrics"]
        sign = {k: 1 if results["higher_is_better"][k] else -1 for k in keys}
        by_hand = 100 * sum(sign[k] * (run[k] - results["baseline"][k]) / results["baseline"][k]
                            for k in keys) / len(keys)
        assert dm == pytest.approx(by_hand)
    # each domain was evaluated on its own test images: accuracy is a multiple of 1/size
    assert "webcam/accuracy" in keys  # Δm used the domains' accuracies
    sizes = data.load("office31", root=tmp_path / "office", **options).test.sizes
    for d, n in sizes.items():
        acc = results["runs"]["ew"][0]["test"][f"{d}/accuracy"]
        assert round(acc * n) == pytest.approx(acc * n)


def _balancer(name: str, tasks: list[str]) -> balancers.Balancer:
    extra = {"fixed": {"weights": dict(zip(tasks, (1.0, 2.0, 0.5)))},
             "prior_loss": {"priors": dict(zip(tasks, (0.7, 0.7, 1.0)))}}
    return balancers.create(name, tasks=tasks, **extra.get(name, {}))


METHODS = [m for m in balancers.available() if m != "torchjd"]


@pytest.mark.parametrize("method", METHODS)
def test_a_task_without_labels_in_a_batch_gets_no_gradient_and_no_nan(method: str,
                                                                       tmp_path: Path) -> None:
    write_click_log(tmp_path / "log.csv", n=40)
    b = data.load("tabular", root=tmp_path, file="log.csv", categorical=["user", "item"],
                  numeric=["price"], tasks={"click": "binary", "conversion": "binary",
                                            "rating": "regression"})
    names = b.task_names
    # a batch of unclicked rows: conversion has no label in it
    rows = torch.nonzero(b.train.targets["click"] == 0).flatten()[:6]
    x = b.train.inputs[rows]
    y = {t: v[rows] for t, v in b.train.targets.items()}
    mask = {t: v[rows] for t, v in b.train.masks.items()}
    assert not mask["conversion"].any() and mask["click"].all()
    torch.manual_seed(0)
    model = build_model(b.model, b.tasks, b.input_shape, **b.model_options)
    balancer = _balancer(method, names)
    for _ in range(3):
        model.zero_grad()
        out = model(x)
        losses = {t.name: t.loss(out[t.name], y[t.name], mask[t.name]) for t in b.tasks}
        assert losses["conversion"].item() == 0.0
        context = {}
        keys = balancer.context_keys
        if "kpi" in keys:
            context["kpi"] = dict.fromkeys(names, 0.5)
        if "second_losses" in keys or "held_out" in keys:  # the same batch again
            def again() -> dict[str, torch.Tensor]:
                o = model(x)
                return {t.name: t.loss(o[t.name], y[t.name], mask[t.name]) for t in b.tasks}
            context.update({"second_losses": again()} if "second_losses" in keys else
                           {"held_out": again, "parameters": list(model.parameters())})
        step = balancer.backward(losses, shared=model.shared_parameters(),
                                 features=model.features, **context)
        assert torch.isfinite(step.weight_tensor).all()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        for p in model.task_parameters("conversion"):
            assert p.grad is None or not p.grad.any()
        if balancer.needs_after_step:
            with torch.no_grad():
                out = model(x)
            balancer.after_step({t.name: t.loss(out[t.name], y[t.name], mask[t.name])
                                 for t in b.tasks})
    # the shared update is the one without the unlabelled task: its gradient is exactly zero
    model.zero_grad()
    out = model(x)
    conv = b.tasks[1].loss(out["conversion"], y["conversion"], mask["conversion"])
    grads = torch.autograd.grad(conv, list(model.shared_parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_metrics_skip_a_batch_without_labels(tmp_path: Path) -> None:
    write_click_log(tmp_path / "log.csv", n=40)
    b = data.load("tabular", root=tmp_path, file="log.csv", categorical=["user"],
                  tasks={"click": "binary", "conversion": "binary"})
    task = b.tasks[1]
    clicked = b.train.masks["conversion"]
    pred = torch.randn(len(clicked), 2)
    alone, mixed = task.metrics(), task.metrics()
    for name in alone:
        alone[name].update(pred[clicked], b.train.targets["conversion"][clicked])
        mixed[name].update(pred[~clicked], b.train.targets["conversion"][~clicked],
                           torch.zeros(int((~clicked).sum()), dtype=torch.bool))
        mixed[name].update(pred[clicked], b.train.targets["conversion"][clicked])
        assert mixed[name].compute() == pytest.approx(alone[name].compute())


def test_mtlkit_train_dataset_root_uses_the_protocol_model(tmp_path: Path, capsys) -> None:
    from mtlkit import cli
    from mtlkit.train.checkpoint import load_checkpoint

    write_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "multimnist", "--root", str(tmp_path / "mnist"),
                     "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '"method": "ew"' in printed and "left/accuracy" in printed
    state = load_checkpoint(out / "checkpoint.pt")["model"]
    assert "encoder.conv2.weight" in state  # the MultiMNIST LeNet, not the default CNN
    assert tuple(state["encoder.fc.weight"].shape) == (50, 320)


@pytest.mark.parametrize("name", ["tabular_mlp", "tabular_mmoe", "tabular_cgc", "tabular_ple",
                                  "esmm", "aitm"])
def test_tabular_models_train_on_embedded_inputs(name: str, tmp_path: Path) -> None:
    write_click_log(tmp_path / "log.csv", n=40)
    b = data.load("tabular", root=tmp_path, file="log.csv", categorical=["user", "item"],
                  numeric=["price"],
                  tasks={"ctr": {"column": "click", "kind": "binary"},
                         "ctcvr": {"column": "conversion", "kind": "binary",
                                   "entire_space": "click"}})
    torch.manual_seed(0)
    model = build_model(name, b.tasks, b.input_shape, **b.model_options)
    x, y = b.train.inputs[:8], {t: v[:8] for t, v in b.train.targets.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        out = model(x)
        assert {t: tuple(o.shape) for t, o in out.items()} == {"ctr": (8, 2), "ctcvr": (8, 2)}
        loss = sum(t.loss(out[t.name], y[t.name]) for t in b.tasks)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first  # it learns through the embeddings
    emb = model.embedding.tables[0].weight
    assert emb.grad is not None and emb.grad.any()
