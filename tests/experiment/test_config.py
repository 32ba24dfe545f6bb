"""The experiment config: YAML and Python alike, --set overrides, one-line errors per field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtlkit import cli
from mtlkit.experiment import Experiment, apply_override, parse_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_numbers_as_people_write_them():
    data = parse_yaml("a: 1e-3\nb: -2.5E+4\nc: 1.0e-4\nd: 3\ne: '1e-3'\nf: .5\ng: 1_000")
    assert data == {"a": 1e-3, "b": -25000.0, "c": 1e-4, "d": 3, "e": "1e-3", "f": 0.5,
                    "g": 1000}
    assert type(data["a"]) is float and type(data["d"]) is int


def test_yaml_and_python_give_the_same_experiment(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("optimizer: {name: sgd, lr: 1e-2, momentum: 0.9, nesterov: true}\n"
                    "scheduler: {name: multistep, milestones: [3, 6], gamma: 0.5,"
                    " warmup_epochs: 0.5}\nseeds: [0, 7]\nmethods: [ew, mgda]\n"
                    "hparams: {mgda: {normalization: l2}}\ngrad_clip: 1e1\n")
    from_yaml = Experiment.from_file(path)
    from_python = Experiment.from_dict({
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
        "scheduler": {"name": "multistep", "milestones": [3, 6], "gamma": 0.5,
                      "warmup_epochs": 0.5},
        "seeds": [0, 7], "methods": ["ew", "mgda"], "hparams": {"mgda": {"normalization": "l2"}},
        "grad_clip": 10.0})
    assert from_yaml == from_python
    assert from_yaml.seed_list() == [0, 7]
    cfg = from_yaml.train_config(7)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.seed, cfg.grad_clip) == (
        "sgd", 0.01, 0.9, True, 7, 10.0)
    assert Experiment.from_dict({"scheduler": "cosine"}).scheduler.name == "cosine"


def test_set_reaches_every_field_and_parses_values_as_yaml():
    exp = Experiment().with_overrides([
        "optimizer.lr=1e-4", "hparams.mgda.grad_on=features", "methods=[ew, mgda]",
        "scheduler.milestones=[2, 4]", "scheduler.name=multistep", "max_steps=2",
        "model_options.width=8", "root=null"])
    assert exp.optimizer.lr == 1e-4 and exp.hparams == {"mgda": {"grad_on": "features"}}
    assert exp.methods == ["ew", "mgda"] and exp.scheduler.milestones == [2, 4]
    assert exp.max_steps == 2 and exp.model_options == {"width": 8} and exp.root is None
    data = {"optimizer": "sgd"}
    apply_override(data, "optimizer.momentum=0.9")  # a section given as a bare name
    assert data == {"optimizer": {"name": "sgd", "momentum": 0.9}}


def test_the_default_config_file_writes_out_every_default():
    shipped = Experiment.from_file(ROOT / "configs" / "default.yaml")
    assert shipped == Experiment(out="reports/compare", keep_checkpoint="none")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["epochs=0"], r"epochs must be an integer >= 1, got 0"),
        (["epochs=2.5"], r"epochs must be an integer >= 1, got 2\.5"),
        (["dataset=nope"], r"dataset: unknown dataset 'nope'; available: .*multidigits"),
        (["dataset=mypkg.data:1x"], r"dataset: .mypkg.data:1x. is not of the form"),
        (["model=nope"], r"model: unknown model 'nope'; available: .*hard_sharing"),
        (["optimizer.name=adagrad"], r"optimizer\.name must be one of \['adam', 'adamw', 'sgd'\]"),
        (["optimizer.lr=1e-3x"], r"optimizer\.lr must be a positive number, got '1e-3x'"),
        (["optimizer.nesterov=true"], r"optimizer\.nesterov needs name: sgd and a momentum > 0"),
        (["optimizer.betas=[0.9]"], r"optimizer\.betas must be two numbers"),
        (["optimizer.lrr=1"], r"optimizer: unknown field\(s\) \['lrr'\]"),
        (["scheduler.name=exponential"], r"scheduler\.name must be one of"),
        (["scheduler.name=multistep"], r"scheduler\.milestones must name at least one epoch"),
        (["scheduler.gamma=2"], r"scheduler\.gamma must be a number in \(0, 1\]"),
        (["scheduler.milestones=[5, 2]"], r"scheduler\.milestones must be increasing"),
        (["grad_clip=-1"], r"grad_clip must be a positive number"),
        (["eval_every=0"], r"eval_every must be an integer >= 1"),
        (["keep_checkpoint=all"], r"keep_checkpoint must be one of \['last', 'best', 'none'\]"),
        (["seeds=[1, 1]"], r"seeds must be a count >= 1 or a list of distinct"),
        (["methods=[ew, nope]"], r"methods: unknown method 'nope'"),
        (["methods=[ew]", "hparams.mgda.x=1"], r"hparams\.mgda: 'mgda' is not one of the methods"),
        (["hparams.uw.x=1"], r"hparams\.uw: uw: unknown hyperparameter\(s\) \['x'\]"),
        (["task_lr.left=0"], r"task_lr\.left must be a positive number"),
        (["max_samples=0"], r"max_samples must be an integer >= 1 or null"),
        (["device=cuda"], r"device: 'cuda' is not available: this machine has no CUDA"),
        (["device=gpu0"], r"device: 'gpu0' is not a device name"),
        (["nope=1"], r"--set nope: unknown field 'nope'"),
        (["epochs"], r"--set expects key=value, got 'epochs'"),
        (["optimizer.lr=[1"], r"--set optimizer\.lr is not valid YAML"),
    ],
)
def test_a_bad_field_in_each_section_is_one_line_exit_2(tmp_path, capsys, sets, message):
    import torch

    if "device=cuda" in sets and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = ["compare", "--out", str(tmp_path / "out")]
    for item in sets:
        args += ["--set", item]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mtlkit: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained


def test_help_shows_every_default_and_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for key, shown in (("optimizer.lr", "[0.003]"), ("scheduler.name", '["plateau"]'),
                       ("scheduler.patience", "[2]"), ("epochs", "[40]"), ("min_delta", "[0.005]"), ("jobs", '["auto"]'), ("batch_size", "[64]"), ("eval_every", "[1]"),
                       ("patience", "[5]"),
                       ("keep_checkpoint", "[none for compare, last for train]")):
        assert re.search(rf"^  {re.escape(key)} +{re.escape(shown)}$", text, re.MULTILINE), key
    assert "--set KEY=VALUE" in text and "--model MODEL" in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    import mtlkit

    assert capsys.readouterr().out.startswith(f"mtlkit {mtlkit.__version__} (torch ")


def test_model_options_keyed_by_model_apply_to_that_model_only():
    """A key naming a model holds that model's options; plain keys apply to any model and win;
    the dataset's default model gets its section over the dataset's own options."""
    from types import SimpleNamespace

    exp = Experiment.from_dict({"model": "cross_stitch", "model_options": {
        "cross_stitch": {"init": [0.8, 0.2], "width": 4}, "nddr": {"init": [0.7, 0.3]},
        "width": 8}})
    assert exp.model_options_for("cross_stitch") == {"init": [0.8, 0.2], "width": 8}
    assert exp.model_options_for("nddr") == {"init": [0.7, 0.3], "width": 8}
    assert exp.model_options_for("mtan") == {"width": 8}
    bundle = SimpleNamespace(model="nddr", model_options={"resnet": "resnet18", "init": [1, 0]})
    assert exp.model_spec(bundle) == ("cross_stitch", {"init": [0.8, 0.2], "width": 8})
    assert exp.replace(model=None).model_spec(bundle) == (
        "nddr", {"resnet": "resnet18", "init": [0.7, 0.3], "width": 8})
    # --set reaches into a section; the plain form is unchanged (no section: as before)
    exp = exp.with_overrides(["model_options.nddr.init=[0.5, 0.5]", "model=nddr"])
    assert exp.model_spec(bundle)[1] == {"init": [0.5, 0.5], "width": 8}
    plain = Experiment.from_dict({"model_options": {"width": 8}})
    assert plain.model_spec(bundle) == ("nddr", {"resnet": "resnet18", "init": [1, 0],
                                                 "width": 8})
    # a package.module:function key is a section too
    user = Experiment.from_dict({"model": "mymod:build",
                                 "model_options": {"mymod:build": {"hidden": 3}}})
    assert user.model_options_for("mymod:build") == {"hidden": 3}


@pytest.mark.parametrize(("options", "message"), [
    ({"nddr": 3}, (r"^model_options\.nddr must be a mapping of options for the model 'nddr', "
                  r"got 3$")),
    ({"mymod:": {}}, (r"^model_options\.mymod:: 'mymod:' is not of the form "
                     r"package\.module:function$")),
    ({1: 2}, r"^model_options: keys are option or model names, got 1$"),
])
def test_bad_model_option_sections_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Experiment.from_dict({"model_options": options})
    with pytest.raises(ValueError, match=r"model_options\.nddr must be a mapping"):
        Experiment().with_overrides(["model_options.nddr=0.8"])


def test_a_misspelt_model_section_is_named_when_the_model_is_built():
    from types import SimpleNamespace

    from mtlkit.tasks import Task

    exp = Experiment.from_dict({"model": "cross_stitch",
                                "model_options": {"cross_stich": {"init": [0.8, 0.2]}}})
    bundle = SimpleNamespace(model="default", model_options={}, input_shape=(4,))
    with pytest.raises(ValueError) as err:
        exp.build_model(bundle, [Task.regression("a"), Task.regression("b")])
    text = str(err.value)
    assert "\n" not in text and text.startswith("model_options: ")
    assert "'cross_stich'" in text and "did you mean 'cross_stitch'?" in text
