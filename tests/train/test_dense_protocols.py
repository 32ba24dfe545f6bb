"""The dense-prediction survey's protocol configs train two steps end to end on CPU, with every
model choice, and the trainer adds PAD-Net / MTI-Net's deep-supervision losses."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mtlkit
from mtlkit.experiment import Experiment

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from dense_fixtures import write_nyud, write_pascal

CONFIGS = Path(__file__).parents[2] / "configs"
TINY_HRNET = {"width": 4, "modules": [1, 1, 1], "blocks": 1, "stem_blocks": 1}
#: each model choice at a test size (the configs use every builder's default size)
SMALL = {
    "mti_net": {"hrnet": TINY_HRNET},
    "pad_net": {"hrnet": TINY_HRNET, "channels": 4},
    "nddr": {"resnet": "resnet18", "layers": [1, 1, 1, 1], "head_channels": 8},
    "mtan": {"backbone": "resnet18", "head_channels": 8},
    "cross_stitch": {"width": 4},
    "hard_sharing": {"backbone": "resnet18", "head_channels": 8},
}
WRITERS = {"nyud-survey.yaml": write_nyud, "pascal-survey.yaml": write_pascal}


def _two_steps(tmp_path: Path, config: str, model: str | None) -> tuple[object, dict]:
    exp = Experiment.from_file(CONFIGS / config)
    root = tmp_path / "data"
    WRITERS[config](root, train=5)  # 4 for training, 1 held out for validation
    name = model or exp.model
    run = exp.replace(
        root=str(root), model=name, model_options=SMALL[name],
        dataset_options={**exp.dataset_options, "size": [16, 16], "val_fraction": 0.2},
        epochs=1, max_steps=2, batch_size=2, eval_every=1, out=str(tmp_path / "out"),
        keep_checkpoint="last",
    )
    result = mtlkit.train(run)
    return result, json.loads((tmp_path / "out" / "result.json").read_text())


@pytest.mark.parametrize("config", sorted(WRITERS))
def test_protocol_config_trains_two_steps(tmp_path, config) -> None:
    text = (CONFIGS / config).read_text()
    assert "arXiv:2004.13379" in text and "github.com/" in text
    exp = Experiment.from_file(CONFIGS / config)
    assert exp.model == "mti_net" and exp.methods[0] == "fixed"
    # the survey code's setup of its HRNet-W18 models (see the config's header)
    assert (exp.optimizer.name, exp.optimizer.lr, exp.optimizer.weight_decay) == ("adam", 1e-4,
                                                                                 1e-4)
    assert (exp.scheduler.name, exp.scheduler.power, exp.epochs, exp.batch_size) == (
        "poly", 0.9, 100, 8)
    assert exp.delta_m == "per_task" and exp.dataset_options["normals_loss"] == "l1"
    result, record = _two_steps(tmp_path, config, None)
    assert record["global_step"] == 2
    tasks = ["semseg", "depth"] if "nyud" in config else [
        "semseg", "human_parts", "sal", "normals", "edge"]
    assert result.tasks == tasks
    assert exp.hparams["fixed"]["weights"] == (
        {"semseg": 1.0, "depth": 1.0} if "nyud" in config else
        {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0})
    keys = ["semseg/miou", "depth/rmse"] if "nyud" in config else [
        "semseg/miou", "human_parts/miou", "sal/maxF", "normals/mean_angle", "edge/odsF"]
    for key in keys:
        assert np.isfinite(result.test[key]), key


def test_nyud_survey_config_takes_the_four_tasks_with_a_set(tmp_path) -> None:
    exp = Experiment.from_file(CONFIGS / "nyud-survey.yaml").with_overrides([
        "dataset_options.tasks=[semseg, depth, normals, edge]",
        "hparams.fixed.weights={semseg: 1.0, depth: 1.0, normals: 10.0, edge: 50.0}"])
    root = tmp_path / "data"
    write_nyud(root, train=5)
    run = exp.replace(root=str(root), model_options=SMALL["mti_net"],
                      dataset_options={**exp.dataset_options, "size": [16, 16],
                                       "val_fraction": 0.2},
                      epochs=1, max_steps=2, batch_size=2, out=str(tmp_path / "out"))
    result = mtlkit.train(run)
    assert result.tasks == ["semseg", "depth", "normals", "edge"]
    assert np.isfinite(result.test["edge/odsF"]) and np.isfinite(result.test["normals/mean_angle"])


SLOW = {"nddr", "mtan", "hard_sharing"}  # ResNet-18 trunks: built below, trained in the slow suite


@pytest.mark.parametrize("model", [
    pytest.param(m, marks=[pytest.mark.slow] if m in SLOW else [])
    for m in ("pad_net", "nddr", "mtan", "cross_stitch", "hard_sharing")
])
def test_model_choice_selects_the_architecture(tmp_path, model) -> None:
    result, record = _two_steps(tmp_path, "nyud-survey.yaml", model)
    assert record["global_step"] == 2 and record["settings"]["model"] == model
    assert all(np.isfinite(v) for k, v in result.test.items() if k.endswith("/loss"))


def test_every_model_choice_builds_for_both_protocols() -> None:
    from mtlkit.data._nyud import NYUD_TASKS, nyud_tasks
    from mtlkit.data._pascal import PASCAL_TASKS, pascal_tasks
    from mtlkit.nn import MTAN, NDDR, CrossStitch, HardSharing, MTINet, PADNet
    from mtlkit.train.models import build_model

    classes = {"mti_net": MTINet, "pad_net": PADNet, "nddr": NDDR, "mtan": MTAN,
               "cross_stitch": CrossStitch, "hard_sharing": HardSharing}
    for tasks in (nyud_tasks(NYUD_TASKS), pascal_tasks(PASCAL_TASKS)):
        for name, cls in classes.items():
            torch.manual_seed(0)
            model = build_model(name, tasks, (3, 16, 16), **SMALL[name])
            assert isinstance(model, cls), name
            model.eval()
            out = model(torch.randn(1, 3, 16, 16))
            assert {t: tuple(y.shape) for t, y in out.items()} == {
                t.name: (1, t.num_outputs, 16, 16) for t in tasks}, name


def test_trainer_adds_the_deep_supervision_losses(tmp_path) -> None:
    """One step of the fixed-weight balancer: PAD-Net's initial-prediction layers, which no
    final loss reaches, learn only through the deep supervision; with aux_weight 0 they stay."""
    from mtlkit.data import load
    from mtlkit.train.models import build_model
    from mtlkit.train.trainer import TrainConfig, Trainer

    write_nyud(tmp_path / "data")
    bundle = load("nyud", root=str(tmp_path / "data"), size=[16, 16], val_fraction=0.34)
    moved = {}
    for weight in (1.0, 0.0):
        torch.manual_seed(0)
        model = build_model("pad_net", bundle.tasks, bundle.input_shape, hrnet=TINY_HRNET,
                            channels=4, aux_weight=weight)
        before = copy.deepcopy(model.initial.state_dict())
        balancer = mtlkit.balancers.create("ew", tasks=bundle.task_names)
        trainer = Trainer(model, bundle.tasks, balancer,
                          TrainConfig(epochs=1, max_steps=1, batch_size=2, progress=False))
        trainer.fit(bundle.train, bundle.val)
        moved[weight] = any(not torch.equal(before[k], v)
                            for k, v in model.initial.state_dict().items())
    assert moved == {1.0: True, 0.0: False}
