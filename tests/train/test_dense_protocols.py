"""The dense-prediction survey's protocol configs train two steps end to end on CPU, with every
model choice, and the trainer adds PAD-Net / MTI-Net's deep-supervision losses."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

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


#: the survey code's cross-stitch / NDDR init (configs/{pascal/resnet18,nyud/resnet50}/
#: {cross_stitch,nddr_cnn}.yml): alpha on a task's own column, beta from each other column
SURVEY_INIT = {"pascal-survey.yaml": (0.8, 0.05), "nyud-survey.yaml": (0.9, 0.1)}


def _survey_tasks(config: str):
    from mtlkit.data._nyud import nyud_tasks
    from mtlkit.data._pascal import PASCAL_TASKS, pascal_tasks

    return nyud_tasks(["semseg", "depth"]) if "nyud" in config else pascal_tasks(PASCAL_TASKS)


def _mixing(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every (K x K) task-mixing matrix of a cross-stitch or NDDR model, per channel."""
    from mtlkit.nn import NDDR

    if isinstance(model, NDDR):
        out = []
        for layer in model.layers:
            k, c = len(layer.convs), layer.convs[0].weight.shape[0]
            w = torch.stack([conv.weight[:, :, 0, 0].reshape(c, k, c) for conv in layer.convs])
            # w[i, ch, j, ch2]: task i's output channel ch from task j's channel ch2
            eye = torch.eye(c, dtype=torch.bool)
            assert torch.all(w.permute(0, 2, 1, 3)[:, :, ~eye] == 0)  # channel-diagonal
            out.append(torch.diagonal(w, dim1=1, dim2=3).permute(2, 0, 1))  # (C, K, K)
        return out
    return [u.alpha.detach().reshape(-1, *u.alpha.shape[-2:]) for u in model.units]


def _experiment(config: str, how: str, model: str, small: list[str]) -> Experiment:
    """The survey config with ``model`` chosen as a user would: ``--model``, or ``--set``."""
    from mtlkit import cli

    flags = ["--model", model] if how == "--model" else ["--set", f"model={model}"]
    argv = ["train", "--config", str(CONFIGS / config), *flags, "--set", "methods=[fixed]"]
    for item in small:
        argv += ["--set", item]
    args = cli.build_parser().parse_args(argv)
    return Experiment.from_dict(cli._experiment_data(args))


@pytest.mark.parametrize("how", ["--model", "--set"])
@pytest.mark.parametrize("config", sorted(SURVEY_INIT))
@pytest.mark.parametrize("model", ["cross_stitch", "nddr"])
def test_survey_configs_start_cross_stitch_and_nddr_at_the_survey_init(config, model, how):
    """PASCAL's five tasks: 0.8 on the diagonal, 0.05 from each of the four other tasks (each
    row sums to 1); NYUD's two: 0.9 and 0.1. The model is built with the config's options
    (plus test sizes in the model's own section) and its parameters are read."""
    from mtlkit.train.models import build_model

    small = {"cross_stitch": ["model_options.cross_stitch.width=4"],
             "nddr": ["model_options.nddr.resnet=resnet18",
                      "model_options.nddr.layers=[1, 1, 1, 1]",
                      "model_options.nddr.head_channels=8"]}[model]
    exp = _experiment(config, how, model, small)
    name, options = exp.model_spec(SimpleNamespace(model="mti_net", model_options={}))
    tasks = _survey_tasks(config)
    net = build_model(name, tasks, (3, 16, 16), **options)
    alpha, beta = SURVEY_INIT[config]
    k = len(tasks)
    want = torch.full((k, k), beta).fill_diagonal_(alpha)
    mats = _mixing(net)
    assert len(mats) == (2 if model == "cross_stitch" else 4)  # units / NDDR layers
    for m in mats:
        assert torch.allclose(m, want.expand_as(m), atol=1e-7)
    assert torch.allclose(mats[0][0].sum(1), torch.ones(k))  # survey rows sum to 1


def test_survey_init_reaches_the_resnet_cross_stitch_per_channel():
    """The survey's ResNet-18 cross-stitch (per-channel units after its four stages), with the
    PASCAL config's init: every channel's 5 x 5 mix is 0.8 / 0.05."""
    from mtlkit.train._dense_models import resnet_cross_stitch

    exp = Experiment.from_file(CONFIGS / "pascal-survey.yaml").replace(model="cross_stitch")
    init = exp.model_spec(SimpleNamespace(model="mti_net", model_options={}))[1]["init"]
    net = resnet_cross_stitch(_survey_tasks("pascal-survey.yaml"), (3, 16, 16), "resnet18",
                              init, layers=[1, 1, 1, 1], head_channels=8)
    want = torch.full((5, 5), 0.05).fill_diagonal_(0.8)
    assert [u.alpha.shape[0] for u in net.units] == [64, 128, 256, 512]
    for u in net.units:
        assert torch.allclose(u.alpha.detach(), want.expand_as(u.alpha), atol=1e-7)


@pytest.mark.parametrize("config", sorted(SURVEY_INIT))
def test_survey_model_sections_leave_the_other_models_alone(config):
    """Only cross_stitch and nddr get an init; the other four choices (and the default
    mti_net) are built with exactly the options they had before; a plain --set wins."""
    bundle = SimpleNamespace(model="mti_net", model_options={})
    exp = Experiment.from_file(CONFIGS / config)
    assert exp.model_spec(bundle) == ("mti_net", {})
    for model in ("pad_net", "mtan", "hard_sharing"):
        assert exp.replace(model=model).model_spec(bundle) == (model, {})
        chosen = exp.with_overrides([f"model={model}", "model_options.head_channels=8"])
        assert chosen.model_spec(bundle) == (model, {"head_channels": 8})
    alpha, beta = SURVEY_INIT[config]
    k = 2 if "nyud" in config else 5
    for model in ("cross_stitch", "nddr"):
        assert exp.replace(model=model).model_spec(bundle) == (
            model, {"init": [alpha, beta * (k - 1)]})
        mine = exp.with_overrides([f"model={model}", "model_options.init=[1.0, 0.0]"])
        assert mine.model_spec(bundle)[1] == {"init": [1.0, 0.0]}
