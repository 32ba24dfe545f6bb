"""A user's own model and dataset, from a package of theirs, through the CLI and the Python API;
--quick on every kind of dataset."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import mtlkit
from mtlkit import cli

NETS = '''
import torch
from torch import nn
from mtlkit.nn import HardSharing


def build(tasks, input_shape, hidden=16, nan_after=None):
    """A user's model: any nn.Module returning {task: output} (HardSharing gives the partition)."""
    model = HardSharing(nn.Sequential(nn.Linear(input_shape[0], hidden), nn.Tanh()),
                        {t.name: nn.Linear(hidden, t.num_outputs) for t in tasks})
    if nan_after is not None:  # for the tests: the output turns NaN after this many calls
        calls = {"n": 0}

        def poison(module, args, out):
            if module.training:
                calls["n"] += 1
                if calls["n"] > nan_after:
                    return {k: v * float("nan") for k, v in out.items()}
            return out

        model.register_forward_hook(poison)
    return model
'''
DATA = '''
import torch
from mtlkit.data import DatasetBundle, MultiTaskTensorDataset
from mtlkit.tasks import Task


def load(n=96, seed=0):
    """A user's data: two regression tasks on 5 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 64, 5, generator=g)
    y = {"a": x[:, 0] * 2, "b": x[:, 1] - x[:, 2]}

    def part(lo, hi):
        return MultiTaskTensorDataset(x[lo:hi], {k: v[lo:hi] for k, v in y.items()})

    return DatasetBundle("mine", part(0, n), part(n, n + 32), part(n + 32, n + 64),
                         (Task.regression("a"), Task.regression("b")), (5,))
'''


@pytest.fixture(scope="module")
def user_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    pkg = root / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    (pkg / "data.py").write_text(textwrap.dedent(DATA))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


USER = ["--model", "mypkg.nets:build", "--dataset", "mypkg.data:load", "--epochs", "2",
        "--batch-size", "32", "--methods", "ew,mgda"]


def test_users_model_and_dataset_by_module_path_cli_and_python_agree(user_package, tmp_path,
                                                                     capsys):
    out = tmp_path / "cli"
    assert cli.main(["compare", *USER, "--set", "model_options.hidden=8", "--out", str(out)]) == 0
    from_cli = json.loads((out / "results.json").read_text())
    assert from_cli["tasks"] == ["a", "b"] and set(from_cli["methods"]) == {"ew", "mgda"}
    assert (out / "report.md").is_file()
    assert from_cli["config"]["model"] == "mypkg.nets:build"
    run = json.loads((out / "runs" / "mgda" / "seed0" / "result.json").read_text())
    assert run["settings"]["model_options"] == {"hidden": 8}
    # no checkpoint stays after a comparison by default (keep_checkpoint: none)
    assert not list(out.rglob("*.pt"))

    results = mtlkit.compare({"model": "mypkg.nets:build", "dataset": "mypkg.data:load",
                              "model_options": {"hidden": 8}, "epochs": 2, "batch_size": 32,
                              "methods": ["ew", "mgda"],
                              "out": str(tmp_path / "py")}, report=False)
    for m in ("ew", "mgda"):  # the CLI is a thin layer: the same numbers
        assert results["methods"][m]["metrics"] == from_cli["methods"][m]["metrics"]
    result = mtlkit.train({"model": "mypkg.nets:build", "dataset": "mypkg.data:load",
                           "methods": ["mgda"], "epochs": 2, "batch_size": 32,
                           "model_options": {"hidden": 8},
                           "out": str(tmp_path / "one")})
    assert result.test == from_cli["runs"]["mgda"][0]["test"]
    assert (tmp_path / "one" / "checkpoint.pt").is_file()  # train keeps its last by default


def test_a_users_dataset_that_returns_something_else_is_named(user_package, tmp_path, capsys):
    (user_package / "mypkg" / "bad.py").write_text("def load():\n    return [1, 2]\n")
    code = cli.main(["train", "--dataset", "mypkg.bad:load", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1
    assert "dataset 'mypkg.bad:load' returned a list, not a mtlkit.data.DatasetBundle" in err
    code = cli.main(["train", "--dataset", "mypkg.nope:load", "--out", str(tmp_path / "o")])
    assert code == cli.EXIT_USAGE
    assert "cannot import 'load' from 'mypkg.nope'" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["gradnorm_toy", "mypkg.data:load",
                                     pytest.param("nyuv2", marks=pytest.mark.slow)])
def test_quick_works_for_every_dataset(user_package, tmp_path, capsys, dataset):
    """None of these datasets has a ``size`` option (multidigits has): --quick cuts any split."""
    args = ["compare", "--quick", "--dataset", dataset, "--methods", "ew",
            "--out", str(tmp_path / "q")]
    if dataset == "nyuv2":
        from test_protocols import write_nyuv2

        args += ["--root", str(write_nyuv2(tmp_path / "nyu", train=8)), "--model",
                 "resnet18_deeplab", "--set", "model_options.head_channels=8",
                 "--batch-size", "2"]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["config"]["max_samples"] == 64 and results["config"]["epochs"] == 1
    steps = json.loads((tmp_path / "q" / "runs" / "ew" / "seed0" / "result.json").read_text())
    assert 1 <= steps["global_step"] <= 5
