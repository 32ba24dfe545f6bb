"""The benchmark loaders on tiny files in their real formats: shapes, dtypes, targets, splits,
ignore index, vocabularies from train only, errors naming the file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmark_files import (
    write_census,
    write_cityscapes,
    write_click_log,
    write_mnist,
    write_office,
    write_qm9,
)

from mtlkit import data
from mtlkit.data import MultiInputDataset


# ------------------------------------------------------------------ Cityscapes
def test_cityscapes_reads_the_mtan_layout(tmp_path: Path) -> None:
    written = write_cityscapes(tmp_path, n_train=5, n_val=2, h=4, w=8)
    b = data.load("cityscapes", root=tmp_path, seed=0, val_fraction=0.2)
    assert b.task_names == ["seg", "depth"] and b.input_shape == (3, 4, 8)
    assert (len(b.train), len(b.val), len(b.test)) == (4, 1, 2)
    assert sorted(b.train.indices + b.val.indices) == list(range(5))
    x, y = b.test[1]
    assert x.shape == (3, 4, 8) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), written["val"][1]["image"])
    assert y["seg"].dtype == torch.int64 and y["seg"].shape == (4, 8)
    np.testing.assert_array_equal(y["seg"].numpy(), written["val"][1]["label_7"].astype(np.int64))
    assert y["depth"].shape == (1, 4, 8)
    # -1 is ignored: a prediction right on every labelled pixel scores a perfect mIoU
    seg = b.tasks[0]
    m = seg.metrics()["miou"]
    logits = torch.nn.functional.one_hot(y["seg"].clamp_min(0), 7).permute(2, 0, 1)[None].float()
    m.update(logits, y["seg"][None])
    assert (y["seg"] == -1).any() and m.compute() == 1.0
    assert seg.loss(logits * 50, y["seg"][None]).item() < 1e-6


def test_cityscapes_19_classes_and_missing_files_are_named(tmp_path: Path) -> None:
    write_cityscapes(tmp_path, h=4, w=4, classes=19)
    b = data.load("cityscapes", root=tmp_path, num_classes=19)
    assert b.tasks[0].num_outputs == 19
    with pytest.raises(FileNotFoundError, match="label_7"):
        data.load("cityscapes", root=tmp_path)
    (tmp_path / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/depth/1\.npy"):
        data.load("cityscapes", root=tmp_path, num_classes=19)
    np.save(tmp_path / "val" / "depth" / "1.npy", np.zeros((4, 4, 1), np.float32))
    np.save(tmp_path / "train" / "label_19" / "0.npy", np.full((4, 4), 25.0, np.float32))
    b = data.load("cityscapes", root=tmp_path, num_classes=19, val_fraction=0.25)
    with pytest.raises(ValueError, match=r"label_19/0\.npy holds label 25; expected -1\.\.18"):
        (b.train if 0 in b.train.indices else b.val)[0]


# ------------------------------------------------------------------ Office
def test_office31_is_multi_input_with_libmtl_lists(tmp_path: Path) -> None:
    lists = write_office(tmp_path)
    b = data.load("office31", root=tmp_path, image_size=8)
    assert b.task_names == ["amazon", "dslr", "webcam"] and b.input_shape == (3, 8, 8)
    assert isinstance(b.train, MultiInputDataset)
    assert b.train.sizes == {"amazon": 3, "dslr": 2, "webcam": 4}
    assert b.test.sizes == {"amazon": 2, "dslr": 1, "webcam": 1}
    x, y = b.train.datasets["webcam"][2]
    _rel, label, pixels = lists["webcam"]["train"][2]
    assert list(y) == ["webcam"] and int(y["webcam"]) == label and y["webcam"].dtype == torch.int64
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (pixels / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)
    assert all(t.num_outputs == 31 for t in b.tasks)


def test_office_lists_errors_name_the_file(tmp_path: Path) -> None:
    write_office(tmp_path)
    (tmp_path / "dslr_val.txt").write_text("dslr/images/a.jpg 31\n")
    with pytest.raises(ValueError, match=r"dslr_val\.txt line 1 must be '<image path> <label in "
                                         r"0\.\.30>'"):
        data.load("office31", root=tmp_path)
    (tmp_path / "dslr_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing image list .*dslr_val\.txt"):
        data.load("office31", root=tmp_path)


# ------------------------------------------------------------------ MultiMNIST
def test_multimnist_is_deterministic_from_the_idx_files(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path, n_train=10, n_test=4)
    a = data.load("multimnist", root=tmp_path, val_fraction=0.2)
    b = data.load("multimnist", root=tmp_path, val_fraction=0.2)
    assert (len(a.train), len(a.val), len(a.test)) == (8, 2, 4)
    assert a.input_shape == (1, 28, 28) and a.task_names == ["left", "right"]
    assert torch.equal(a.train.inputs, b.train.inputs)
    x, y = a.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert int(y["left"]) == raw["t10k_labels"][3]  # image i is the left digit
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(1)).numpy()
    assert int(y["right"]) == raw["t10k_labels"][perm[3]]
    # the canvas: left at the top-left, right shifted by 6, max where they overlap, 36 -> 28
    canvas = np.zeros((36, 36))
    canvas[6:34, 6:34] = raw["t10k_images"][perm[3]]
    canvas[:28, :28] = np.maximum(canvas[:28, :28], raw["t10k_images"][3])
    small = torch.nn.functional.interpolate(torch.tensor(canvas)[None, None].float(), (28, 28),
                                            mode="bilinear", antialias=True)[0, 0]
    expected = (small.round().clamp(0, 255) / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(x[0], expected)


def test_multimnist_malformed_idx_file_is_named(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03rubbish")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte is not an idx file"):
        data.load("multimnist", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load("multimnist", root=tmp_path)


# ------------------------------------------------------------------ Census
def test_census_mmoe_task_groups_and_train_only_vocabulary(tmp_path: Path) -> None:
    write_census(tmp_path, n_train=12, n_test=8)
    b = data.load("census", root=tmp_path, seed=0)
    assert b.task_names == ["income", "marital"] and b.model == "tabular_mmoe"
    assert (len(b.train), len(b.val), len(b.test)) == (12, 4, 4)
    cat, num = b.info["categorical"], b.info["numeric"]
    assert len(cat) + len(num) == 42 - 4 and len(num) == 7  # 4: labels + instance weight
    assert "education" not in cat and "income" not in cat and "instance_weight" not in cat
    assert b.input_shape == (38,)
    vocab = b.info["vocabularies"]["class_of_worker"]
    assert "Federal government" not in vocab  # seen only in the test file
    j = cat.index("class_of_worker")
    codes = torch.cat([b.val.inputs[:, j], b.test.inputs[:, j]])
    assert (codes == 0).sum() == 1  # the unseen worker class -> the one OOV index
    assert b.model_options["cardinalities"][j] == len(vocab) + 1
    # numeric columns standardised with the training statistics
    train_num = b.train.inputs[:, len(cat):]
    torch.testing.assert_close(train_num.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    lines = (tmp_path / "census-income.data").read_text().splitlines()
    marital = [ln.split(", ")[7] == "Never married" for ln in lines]
    assert b.train.targets["marital"].tolist() == [int(m) for m in marital]
    g2 = data.load("census", root=tmp_path, tasks="education_marital")
    college = [ln.split(", ")[4] in ("Bachelors degree(BA AB BS)", "Doctorate degree(PhD EdD)")
               for ln in lines]
    assert g2.train.targets["education"].tolist() == [int(c) for c in college]


def test_census_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    write_census(tmp_path)
    with (tmp_path / "census-income.test").open("a") as f:
        f.write("73, Not in universe, 0\n")
    with pytest.raises(ValueError, match=r"census-income\.test line 9 has 3 cells, expected 42"):
        data.load("census", root=tmp_path)


# ------------------------------------------------------------------ tabular
CLICK_TASKS = {"click": "binary", "conversion": "binary", "rating": "regression"}


def test_tabular_click_log_masks_empty_cells(tmp_path: Path) -> None:
    write_click_log(tmp_path / "log.csv", n=40)
    b = data.load("tabular", root=tmp_path, file="log.csv", categorical=["user", "item"],
                  numeric=["price"], tasks=CLICK_TASKS, val_fraction=0.25, test_fraction=0.25)
    assert (len(b.train), len(b.val), len(b.test)) == (20, 10, 10)
    x, y, _mask = b.train[0]
    assert x.shape == (3,) and x.dtype == torch.float32
    assert y["click"].dtype == torch.int64 and y["rating"].dtype == torch.float32
    ds = b.train
    # conversion is labelled exactly on the clicked rows; rating where its cell is filled
    assert torch.equal(ds.masks["conversion"], ds.targets["click"] == 1)
    assert torch.equal(ds.masks["click"], torch.ones(20, dtype=torch.bool))
    assert not ds.masks["rating"].all() and ds.masks["rating"].any()
    assert [t.kind for t in b.tasks] == ["classification", "classification", "regression"]
    # ESMM's entire-space label: click AND conversion, labelled on every row
    e = data.load("tabular", root=tmp_path, file="log.csv", categorical=["user"],
                  tasks={"ctr": {"column": "click", "kind": "binary"},
                         "ctcvr": {"column": "conversion", "kind": "binary",
                                   "entire_space": "click"}})
    t = e.train
    assert t.masks is None or t.masks["ctcvr"].all()
    assert bool((t.targets["ctcvr"] <= t.targets["ctr"]).all())


def test_tabular_vocabulary_and_statistics_come_from_train_only(tmp_path: Path) -> None:
    (tmp_path / "tr.csv").write_text("city,age,y\nb,20,0\na,40,1\nb,60,1\n")
    (tmp_path / "va.csv").write_text("city,age,y\nz,40,0\n")
    (tmp_path / "te.csv").write_text("city,age,y\na,100,1\n")
    b = data.load("tabular", root=tmp_path, train="tr.csv", val="va.csv", test="te.csv",
                  categorical=["city"], numeric=["age"], tasks={"y": "binary"})
    assert b.info["vocabularies"] == {"city": ["a", "b"]}  # codes 1, 2; 0 = unseen
    std = float(np.std([20, 40, 60]))
    assert b.val.inputs.tolist() == [[0.0, 0.0]]  # 'z' -> OOV; 40 is the training mean
    assert b.test.inputs[0, 0] == 1.0
    assert b.test.inputs[0, 1].item() == pytest.approx((100 - 40) / std)


def test_tabular_reads_parquet_like_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    write_click_log(tmp_path / "log.csv", n=20)
    rows = [ln.split(",") for ln in (tmp_path / "log.csv").read_text().splitlines()]
    cols = {name: [r[i] or None for r in rows[1:]] for i, name in enumerate(rows[0])}
    cols["price"] = [float(v) for v in cols["price"]]
    cols["conversion"] = [None if v is None else int(v) for v in cols["conversion"]]
    pq.write_table(pa.table(cols), tmp_path / "log.parquet")
    kw = {"categorical": ["user", "item"], "numeric": ["price"], "tasks": CLICK_TASKS}
    a = data.load("tabular", root=tmp_path, file="log.csv", **kw)
    b = data.load("tabular", root=tmp_path, file="log.parquet", **kw)
    assert torch.equal(a.train.inputs, b.train.inputs)
    for t in CLICK_TASKS:
        assert torch.equal(a.train.masks[t], b.train.masks[t])
        assert torch.equal(a.train.targets[t], b.train.targets[t])


@pytest.mark.parametrize(("content", "kw", "message"), [
    ("a,y\nx,1\n", {"numeric": ["b"]}, r"log\.csv has no column\(s\) \['b'\]"),
    ("a,y\nx,2\n", {"categorical": ["a"]}, r"log\.csv column 'y' holds '2'.*0 or 1"),
    ("a,y\nx,1,3\n", {"categorical": ["a"]}, r"log\.csv line 2 has 3 cells, expected 2"),
    ("a,y\nx,1\n", {"categorical": ["a"], "numeric": ["y"]}, "both a feature and a task label"),
])
def test_tabular_bad_files_name_the_file_and_column(tmp_path: Path, content, kw, message) -> None:
    (tmp_path / "log.csv").write_text(content * 1)
    with pytest.raises(ValueError, match=message):
        data.load("tabular", root=tmp_path, file="log.csv", tasks={"y": "binary"},
                  val_fraction=0.0, test_fraction=0.0, **kw)


def test_tabular_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing file .*nope\.csv"):
        data.load("tabular", root=tmp_path, file="nope.csv", categorical=["a"],
                  tasks={"y": "binary"})


# ------------------------------------------------------------------ QM9
def test_qm9_reads_a_pyg_root_and_normalises_on_train(tmp_path: Path) -> None:
    pytest.importorskip("torch_geometric")
    molecules = write_qm9(tmp_path, n=12)
    b = data.load("qm9", root=tmp_path, seed=0, val_size=2, test_size=3)
    assert (len(b.train), len(b.val), len(b.test)) == (7, 2, 3)
    assert len(b.tasks) == 11 and b.task_names[:3] == ["mu", "alpha", "homo"]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    train_idx = order[5:]
    y = torch.stack([m.y[0] for m in molecules])[:, [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]]
    mean, std = y[train_idx].double().mean(0), y[train_idx].double().std(0)
    x0, t0 = b.train[0]
    m = molecules[int(train_idx[0])]
    expected = ((y[int(train_idx[0])].double() - mean) / std).float()
    torch.testing.assert_close(torch.stack([t0[n] for n in b.task_names]), expected)
    stacked = torch.stack([torch.stack([b.train[i][1][n] for n in b.task_names])
                           for i in range(7)])
    torch.testing.assert_close(stacked.mean(0), torch.zeros(11), atol=1e-5, rtol=0)
    assert x0.shape == (29, 15 + 29) and x0.dtype == torch.float32
    k = m.num_nodes
    assert x0[:, 14].sum() == k and torch.equal(x0[:k, :11], m.x)
    torch.testing.assert_close(x0[:k, 11:14], m.pos)
    bond = int(m.edge_attr[0].argmax()) + 1
    assert x0[0, 15 + 1] == bond and x0[1, 15 + 0] == bond
    # the MAE is in physical units: std (x 1000 for the meV targets) times the normalised error
    homo = b.tasks[2].metrics()["mae"]
    homo.update(torch.ones(4, 1), torch.zeros(4))
    assert homo.compute() == pytest.approx(float(std[2]) * 1000, rel=1e-6)


def test_qm9_missing_processed_file_is_named(tmp_path: Path) -> None:
    pytest.importorskip("torch_geometric")
    with pytest.raises(FileNotFoundError, match=r"processed/data_v3\.pt"):
        data.load("qm9", root=tmp_path)


def test_qm9_without_torch_geometric_says_how_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    monkeypatch.setitem(sys.modules, "torch_geometric.datasets", None)
    with pytest.raises(ImportError, match=r"optional extra: pip install 'mtlkit\[qm9\]'"):
        data.load("qm9", root=tmp_path)
