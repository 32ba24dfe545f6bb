"""Every shipped config loads, validates, and trains two steps on a tiny fixture of its data,
written here in the real file format (MTAN's NYUv2 .npy layout, CelebA's official files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mtlkit
from mtlkit.experiment import Experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write_nyuv2(root: Path, train: int = 5, test: int = 2, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", test)):  # MTAN's 'val' folder is the test split
        for i in range(n):
            arrays = {
                "image": rng.random((size, size, 3)),
                "label": rng.integers(-1, 13, (size, size)),
                "depth": rng.random((size, size, 1)) * 5,
                "normal": rng.normal(size=(size, size, 3)),
            }
            for kind, value in arrays.items():
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                np.save(root / split / kind / f"{i}.npy", value.astype(np.float32))
    return root


def write_celeba(root: Path, parts: tuple[int, ...] = (0, 0, 0, 1, 1, 2)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "img_align_celeba").mkdir(parents=True)
    files = [f"{i + 1:06d}.jpg" for i in range(len(parts))]
    names = [f"Attr_{i}" for i in range(40)]
    lines = [str(len(files)), " ".join(names)]
    for f in files:
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(
            root / "img_align_celeba" / f)
        lines.append(f + " " + " ".join(rng.choice(["-1", "1"], 40)))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(files, parts)))
    return root


def test_every_config_file_is_covered_here():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(PROTOCOLS) | {"famo-next-batch.yaml"}


# config -> (fixture writer or None, what makes exactly two optimiser steps on that fixture)
PROTOCOLS = {
    "default.yaml": (None, {"dataset_options": {"size": 600}, "epochs": 1, "max_steps": 2}),
    "nyuv2-segnet-mtan.yaml": (write_nyuv2, {"epochs": 1}),  # 4 train images at batch 2
    "nyuv2-resnet50-aspp.yaml": (write_nyuv2, {"epochs": 2}),  # one batch of 4 per epoch
    "celeba-famo.yaml": (write_celeba, {"epochs": 2}),  # 3 training images, one batch
}
# The default suite trains the two big NYUv2 models (44M and 72M parameters) at a reduced
# width, everything else as configured; the slow suite trains them as configured.
SMALL = {
    "nyuv2-segnet-mtan.yaml": {"model_options": {"filters": [4, 8, 8, 16, 16]}},
    "nyuv2-resnet50-aspp.yaml": {"model": "resnet18_deeplab",
                                 "model_options": {"head_channels": 8}},
}
CASES = [pytest.param(n, False, id=n) for n in sorted(PROTOCOLS)]
CASES += [pytest.param(n, True, id=f"{n}-full", marks=pytest.mark.slow) for n in SMALL]


@pytest.mark.parametrize(("name", "full"), CASES)
def test_shipped_config_loads_validates_and_trains_two_steps(tmp_path, name, full):
    writer, budget = PROTOCOLS[name]
    exp = Experiment.from_file(CONFIGS / name)
    text = (CONFIGS / name).read_text()
    if name != "default.yaml":  # a protocol cites its paper and code
        assert "arXiv:" in text and "github.com/" in text
    # evaluated once, at the end; no gradient-cosine diagnostics (K extra backward passes)
    changes = {**budget, "eval_every": budget["epochs"], "cosine_every": 0,
               "out": str(tmp_path / "out"), "keep_checkpoint": "last"}
    if not full:
        changes.update(SMALL.get(name, {}))
    if writer is not None:
        changes["root"] = str(writer(tmp_path / "data"))
    run = exp.replace(**changes)
    result = mtlkit.train(run)
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert record["global_step"] == 2
    losses = [v for k, v in result.test.items() if k.endswith("/loss")]
    assert len(losses) == len(result.tasks) and all(np.isfinite(losses))
    settings = record["settings"]  # what the protocol names reached the trainer
    assert settings["optimizer"] == exp.optimizer.name and settings["lr"] == exp.optimizer.lr
    assert settings["weight_decay"] == exp.optimizer.weight_decay
    assert settings["scheduler"]["name"] == exp.scheduler.name
    assert settings["batch_size"] == exp.batch_size
    assert settings["model"] == (run.model or "default")
    if full:
        assert settings["model"] == exp.model and settings["model_options"] == exp.model_options
