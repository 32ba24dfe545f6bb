"""NYUv2 (MTAN layout) and CelebA (official files) loaders, on small files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mtlkit import data

H, W = 4, 6


def _write_nyu_split(folder: Path, n: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "label", "depth", "normal")}
    for kind in arrays:
        (folder / kind).mkdir(parents=True)
    for i in range(n):
        image = rng.random((H, W, 3)).astype(np.float32)
        label = rng.integers(-1, 13, (H, W)).astype(np.float32)  # MTAN stores labels as floats
        depth = (rng.random((H, W, 1)) * 5 * (rng.random((H, W, 1)) > 0.2)).astype(np.float32)
        normal = rng.normal(size=(H, W, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        normal[0, 0] = 0.0  # a pixel without a normal
        for kind, value in zip(arrays, (image, label, depth, normal)):
            np.save(folder / kind / f"{i}.npy", value)
            arrays[kind].append(value)
    return arrays


@pytest.fixture
def nyu_root(tmp_path: Path) -> tuple[Path, dict[str, dict[str, list[np.ndarray]]]]:
    rng = np.random.default_rng(0)
    root = tmp_path / "nyuv2"
    written = {
        "train": _write_nyu_split(root / "train", 10, rng),
        "val": _write_nyu_split(root / "val", 3, rng),
    }
    return root, written


def test_nyuv2_reads_the_mtan_layout(nyu_root) -> None:
    root, written = nyu_root
    b = data.load("nyuv2", root=root, seed=1, val_fraction=0.2)
    assert b.task_names == ["seg", "depth", "normal"] and b.input_shape == (3, H, W)
    assert (len(b.train), len(b.val), len(b.test)) == (8, 2, 3)  # test = the MTAN 'val' folder
    assert not set(b.train.indices) & set(b.val.indices)
    assert sorted(b.train.indices + b.val.indices) == list(range(10))
    x, y = b.test[2]
    assert x.shape == (3, H, W) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), written["val"]["image"][2])
    assert y["seg"].dtype == torch.int64 and y["seg"].shape == (H, W)
    np.testing.assert_array_equal(y["seg"].numpy(), written["val"]["label"][2].astype(np.int64))
    assert y["depth"].shape == (1, H, W) and y["normal"].shape == (3, H, W)
    np.testing.assert_array_equal(y["depth"][0].numpy(), written["val"]["depth"][2][..., 0])
    i = b.val.indices[0]
    np.testing.assert_array_equal(
        b.val[0][1]["normal"].permute(1, 2, 0).numpy(), written["train"]["normal"][i]
    )


def test_nyuv2_tasks_score_a_perfect_prediction(nyu_root) -> None:
    root, _ = nyu_root
    b = data.load("nyuv2", root=root)
    metrics = {t.name: t.metrics() for t in b.tasks}
    for x, y in DataLoader(b.test, batch_size=2):
        seg_logits = (
            torch.nn.functional.one_hot(y["seg"].clamp_min(0), 13).permute(0, 3, 1, 2).float()
        )
        pred = {"seg": seg_logits, "depth": y["depth"], "normal": y["normal"] * 3}
        for t in b.tasks:
            assert t.loss(pred[t.name].requires_grad_(), y[t.name]).isfinite()
            for m in metrics[t.name].values():
                m.update(pred[t.name], y[t.name])
    values = {f"{t}/{k}": m.compute() for t, ms in metrics.items() for k, m in ms.items()}
    assert values["seg/miou"] == 1.0 and values["seg/pixel_acc"] == 1.0
    assert values["depth/abs_err"] == 0.0 and values["depth/rel_err"] == 0.0
    assert values["normal/mean_angle"] == pytest.approx(0.0, abs=0.05)
    assert values["normal/within_11.25"] == 1.0


def test_nyuv2_missing_paths_are_named(nyu_root, tmp_path: Path) -> None:
    root, _ = nyu_root
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.load("nyuv2", root=tmp_path / "nowhere")
    (root / "train" / "depth" / "7.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file .*train/depth/7\.npy"):
        data.load("nyuv2", root=root)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        data.load("nyuv2", root=root, val_fraction=1.0)


# ---------------------------------------------------------------- CelebA
ATTRS = [f"Attr_{i}" for i in range(39)] + ["Smiling"]


def _write_celeba(root: Path, labels: np.ndarray, parts: list[int], size=(11, 9)) -> list[str]:
    (root / "img_align_celeba").mkdir(parents=True)
    files = [f"{i + 1:06d}.jpg" for i in range(len(labels))]
    rng = np.random.default_rng(0)
    for f in files:
        pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / f, quality=95)
    lines = [str(len(files)), " ".join(ATTRS)]
    lines += [f + "  " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, labels)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(files, parts))
    )
    return files


@pytest.fixture
def celeba_root(tmp_path: Path) -> tuple[Path, np.ndarray]:
    labels = np.where(np.random.default_rng(1).random((6, 40)) > 0.5, 1, -1)
    root = tmp_path / "celeba"
    _write_celeba(root, labels, [0, 0, 0, 1, 1, 2])
    return root, labels


def test_celeba_reads_attributes_splits_and_images(celeba_root) -> None:
    root, labels = celeba_root
    b = data.load("celeba", root=root, image_size=8)
    assert (len(b.train), len(b.val), len(b.test)) == (3, 2, 1)
    assert b.task_names == ["attributes"] and b.tasks[0].num_outputs == 40
    assert b.input_shape == (3, 8, 8)
    x, y = b.val[1]  # the fifth image
    assert x.shape == (3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    np.testing.assert_array_equal(y["attributes"].numpy(), (labels[4] + 1) / 2)  # -1/1 -> 0/1
    full = data.load("celeba", root=root, image_size=None)
    assert full.input_shape == (3, 11, 9) and full.train[0][0].shape == (3, 11, 9)
    with Image.open(root / "img_align_celeba" / "000001.jpg") as img:
        ref = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(full.train[0][0].permute(1, 2, 0).numpy(), ref)
    batch = next(iter(DataLoader(b.train, batch_size=3)))
    assert batch[1]["attributes"].shape == (3, 40)
    assert (
        b.tasks[0].loss(torch.zeros(3, 40, requires_grad=True), batch[1]["attributes"]).isfinite()
    )


def test_celeba_attribute_selection_and_per_attribute_tasks(celeba_root) -> None:
    root, labels = celeba_root
    b = data.load("celeba", root=root, attributes=["Smiling", "Attr_3"], per_attribute=True)
    assert b.task_names == ["Smiling", "Attr_3"]
    assert all(t.kind == "classification" and t.num_outputs == 2 for t in b.tasks)
    _, y = b.test[0]
    assert (
        int(y["Smiling"]) == (labels[5, 39] + 1) // 2
        and int(y["Attr_3"]) == (labels[5, 3] + 1) // 2
    )
    with pytest.raises(ValueError, match=r"unknown \['Beard'\]"):
        data.load("celeba", root=root, attributes=["Beard"])


def test_celeba_missing_and_malformed_files(celeba_root, tmp_path: Path) -> None:
    root, _ = celeba_root
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        data.load("celeba", root=tmp_path / "none")
    attr = root / "list_attr_celeba.txt"
    text = attr.read_text()
    attr.write_text(text.replace("6\n", "7\n", 1))
    with pytest.raises(ValueError, match="announces 7 images but lists 6"):
        data.load("celeba", root=root)
    attr.write_text(text.replace(" 1", " 2", 1))
    with pytest.raises(ValueError, match="values must be -1 or 1"):
        data.load("celeba", root=root)
    attr.write_text(text)
    (root / "img_align_celeba" / "000006.jpg").unlink()
    b = data.load("celeba", root=root)
    with pytest.raises(FileNotFoundError, match=r"000006\.jpg"):
        b.test[0]
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition\.txt"):
        data.load("celeba", root=root)
