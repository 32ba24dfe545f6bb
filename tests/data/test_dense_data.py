"""PASCAL-Context and NYUD-v2 loaders on fixtures written in the real file formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dense_fixtures import H, W, write_nyud, write_pascal
from torch.utils.data import DataLoader

from mtlkit import data
from mtlkit.data._pascal import label_boundaries


def test_pascal_context_items_follow_the_survey_files(tmp_path) -> None:
    written = write_pascal(tmp_path)
    bundle = data.load("pascal_context", root=str(tmp_path), size=None, val_fraction=0.34)
    assert bundle.task_names == ["semseg", "human_parts", "sal", "normals", "edge"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (2, 1, 2)
    assert bundle.model == "mti_net" and bundle.input_shape == (3, H, W)
    for split in (bundle.train, bundle.val, bundle.test):
        for k in range(len(split)):
            i = split.ids[k]
            x, y, mask = split[k]
            w = written[i]
            assert x.shape == (3, H, W) and abs(float(x.mean())) < 3  # ImageNet-normalised
            assert torch.equal(y["semseg"], torch.from_numpy(w["semseg"].astype(np.int64)))
            assert int(y["semseg"][0, 0]) == 255  # unlabelled stays 255 (ignored)
            # saliency: grey > 127.5 is salient
            assert y["sal"][0, :, :4].eq(1).all() and y["sal"][0, :, 4:].eq(0).all()
            # normals: 2 x / 255 - 1 on the NYU-compatible classes (3 wall, 7 tvmonitor) only
            n = 2 * torch.from_numpy(w["normals"].astype(np.float32)).permute(2, 0, 1) / 255 - 1
            keep = torch.from_numpy(np.isin(w["labelmap"], [3, 5, 7]))
            torch.testing.assert_close(y["normals"], torch.where(keep, n, torch.zeros(())))
            assert y["normals"][:, :, 5:10].eq(0).all()  # class 9 (sky) has no normals
            # edges: the two band borders
            edge = y["edge"][0]
            assert edge.sum() == 2 * H and edge[:, 4].eq(1).all() and edge[:, 9].eq(1).all()
            # human parts: head -> 1, left foot -> 6; no person -> masked out
            assert bool(mask["human_parts"]) == w["has_person"]
            parts = y["human_parts"]
            if w["has_person"]:
                assert parts[:2, :2].eq(1).all() and parts[-1, -3:].eq(6).all()
                assert int(parts.sum()) == 4 * 1 + 3 * 6
            else:
                assert parts.eq(0).all()


def test_pascal_context_batches_at_a_fixed_size_and_trains_a_step(tmp_path) -> None:
    write_pascal(tmp_path)
    bundle = data.load("pascal_context", root=str(tmp_path), size=[8, 8])
    x, y, mask = next(iter(DataLoader(bundle.test, batch_size=2)))
    assert x.shape == (2, 3, 8, 8) and y["semseg"].shape == (2, 8, 8)
    assert y["normals"].shape == (2, 3, 8, 8) and mask["human_parts"].tolist() == [False, True]
    # every task's loss accepts its batch (parts of the person-less image carry no loss)
    for t in bundle.tasks:
        pred = torch.zeros(2, t.num_outputs, 8, 8, requires_grad=True)
        loss = t.loss(pred, y[t.name], mask.get(t.name))
        assert torch.isfinite(loss)


def test_pascal_context_errors_name_the_file_or_field(tmp_path) -> None:
    write_pascal(tmp_path)
    (tmp_path / "sal_distill" / "2008_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000001.png"):
        data.load("pascal_context", root=str(tmp_path))
    bundle = data.load("pascal_context", root=str(tmp_path), tasks=["semseg", "edge"])
    assert bundle.task_names == ["semseg", "edge"]
    with pytest.raises(ValueError, match="tasks must be distinct names"):
        data.load("pascal_context", root=str(tmp_path), tasks=["depth"])
    with pytest.raises(ValueError, match="size"):
        data.load("pascal_context", root=str(tmp_path), size=[8])


def test_label_boundaries_marks_one_side_of_each_region_border() -> None:
    labels = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    assert np.array_equal(label_boundaries(labels), expected)


def test_nyud_items_follow_the_survey_files(tmp_path) -> None:
    written = write_nyud(tmp_path)
    bundle = data.load("nyud", root=str(tmp_path), val_fraction=0.34)
    assert bundle.task_names == ["semseg", "depth", "normals", "edge"]
    assert [t.primary for t in bundle.tasks] == ["miou", "rmse", "mean_angle", "odsF"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (2, 1, 2)
    for k, i in enumerate(bundle.test.ids):
        x, y = bundle.test[k]
        w = written[i]
        assert x.shape == (3, H, W)
        assert torch.equal(y["semseg"], torch.from_numpy(w["semseg"].astype(np.int64) - 1))
        assert int(y["semseg"].min()) >= -1 and int(y["semseg"].max()) <= 39
        torch.testing.assert_close(y["depth"][0], torch.from_numpy(w["depth"]))
        torch.testing.assert_close(y["normals"].permute(1, 2, 0), torch.from_numpy(w["normals"]))
        torch.testing.assert_close(y["edge"][0], torch.from_numpy(w["edge"]))
    resized = data.load("nyud", root=str(tmp_path), size=[6, 8])
    assert resized.input_shape == (3, 6, 8) and resized.train[0][1]["edge"].shape == (1, 6, 8)
    (tmp_path / "edge" / "0000.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"edge/0000\.npy"):
        data.load("nyud", root=str(tmp_path))


def test_survey_loaders_train_normals_with_the_survey_l1_loss(tmp_path) -> None:
    from mtlkit.tasks import NormalCosineLoss, NormalL1Loss

    write_nyud(tmp_path / "nyud")
    write_pascal(tmp_path / "pascal")
    for name, root in (("nyud", tmp_path / "nyud"), ("pascal_context", tmp_path / "pascal")):
        opts = {"root": str(root), "val_fraction": 0.34, "size": [8, 8]}
        l1 = data.load(name, **opts)
        assert isinstance(l1.tasks[l1.task_names.index("normals")].loss, NormalL1Loss), name
        cos = data.load(name, normals_loss="cosine", **opts)
        assert isinstance(cos.tasks[cos.task_names.index("normals")].loss, NormalCosineLoss)
        with pytest.raises(ValueError, match="normals_loss must be one of"):
            data.load(name, normals_loss="l2", **opts)
