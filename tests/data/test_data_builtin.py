"""The built-in datasets (multidigits, gradnorm_toy) and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from mtlkit import data
from mtlkit.data import DatasetBundle

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return data.load("multidigits", seed=3, size=2000)


# ---------------------------------------------------------------- multidigits
def test_multidigits_shapes_ranges_and_sum(digits: DatasetBundle) -> None:
    assert digits.task_names == ["left", "right", "sum"]
    assert [len(getattr(digits, s)) for s in SPLITS] == [1400, 300, 300]
    for s in SPLITS:
        ds = getattr(digits, s)
        x, y = ds.inputs, ds.targets
        assert x.shape == (len(ds), 1, 12, 12) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        for t in ("left", "right"):
            assert y[t].dtype == torch.int64 and 0 <= int(y[t].min()) and int(y[t].max()) <= 9
        assert y["sum"].dtype == torch.float32
        assert torch.equal(y["sum"], (y["left"] + y["right"]).float())
    # every class shows up on both sides, and the raw sum spans (almost) 0..18
    assert set(digits.train.targets["left"].tolist()) == set(range(10))
    assert float(digits.train.targets["sum"].max()) >= 17


def test_multidigits_is_deterministic_from_the_seed(digits: DatasetBundle) -> None:
    again = data.load("multidigits", seed=3, size=2000)
    other = data.load("multidigits", seed=4, size=2000)
    for s in SPLITS:
        assert torch.equal(getattr(digits, s).inputs, getattr(again, s).inputs)
        assert torch.equal(getattr(digits, s).targets["sum"], getattr(again, s).targets["sum"])
    assert not torch.equal(digits.train.inputs, other.train.inputs)


def test_multidigits_splits_share_no_scan(digits: DatasetBundle) -> None:
    used = {s: set(digits.info["scans"][s].reshape(-1).tolist()) for s in SPLITS}
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]
    owned = {s: set(digits.info["scan_split"][s].tolist()) for s in SPLITS}
    assert sum(len(v) for v in owned.values()) == 1797 == len(set().union(*owned.values()))
    for s in SPLITS:
        assert used[s] <= owned[s]
        pairs = digits.info["scans"][s]
        assert torch.all(pairs[:, 0] != pairs[:, 1])  # two different scans per sample
        assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)  # no repeated pair


def test_multidigits_canvas_is_the_max_of_the_two_placed_scans() -> None:
    b = data.load("multidigits", seed=0, size=60, canvas=14, jitter=0)
    ref = load_digits()
    scans = ref.images / 16.0
    for i in range(5):
        a, c = b.info["scans"]["train"][i].tolist()
        left = np.zeros((14, 14))
        right = np.zeros((14, 14))
        left[:8, :8] = scans[a]
        right[6:, 6:] = scans[c]
        np.testing.assert_allclose(b.train.inputs[i, 0].numpy(), np.maximum(left, right), atol=1e-7)
        assert int(b.train.targets["left"][i]) == ref.target[a]
        assert int(b.train.targets["right"][i]) == ref.target[c]


def test_multidigits_missing_labels_give_train_masks() -> None:
    b = data.load("multidigits", seed=0, size=1000, missing=0.3)
    _, _, mask = b.train[0]
    assert set(mask) == {"left", "right", "sum"} and mask["left"].dtype == torch.bool
    frac = torch.stack([b.train.masks[t] for t in mask]).float().mean().item()
    assert frac == pytest.approx(0.7, abs=0.05)
    assert len(b.val[0]) == 2  # validation stays fully labelled
    batch = next(iter(DataLoader(b.train, batch_size=8)))
    assert batch[0].shape == (8, 1, 12, 12) and batch[2]["sum"].shape == (8,)


def test_multidigits_option_errors() -> None:
    with pytest.raises(ValueError, match="takes no root"):
        data.load("multidigits", root="/tmp")
    with pytest.raises(ValueError, match="canvas=10 is too small for jitter=1"):
        data.load("multidigits", canvas=10)
    with pytest.raises(ValueError, match="split must be three positive fractions"):
        data.load("multidigits", split=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------- gradnorm toy
def test_gradnorm_toy_shapes_and_exact_targets() -> None:
    b = data.load("gradnorm_toy", seed=1, sizes=(300, 50, 40))
    assert b.task_names == ["t0", "t1"] and b.input_shape == (250,)
    assert [len(getattr(b, s)) for s in SPLITS] == [300, 50, 40]
    assert b.info["sigmas"] == (1.0, 100.0)
    B, eps = b.info["B"], b.info["eps"]
    assert B.shape == (100, 250) and eps.shape == (2, 100, 250)
    assert B.std().item() == pytest.approx(10.0, rel=0.02)
    assert eps.std().item() == pytest.approx(3.5, rel=0.02)
    x = b.test.inputs.double()
    for i, s in enumerate((1.0, 100.0)):
        expected = s * torch.tanh(x @ (B + eps[i]).T)
        torch.testing.assert_close(b.test.targets[f"t{i}"].double(), expected, rtol=1e-6, atol=1e-5)


def test_gradnorm_toy_output_scale_follows_sigma() -> None:
    sigmas = (0.5, 3.0, 40.0)
    b = data.load("gradnorm_toy", seed=2, num_tasks=3, sigmas=sigmas, sizes=(2000, 10, 10))
    scales = [b.train.targets[f"t{i}"].abs().mean().item() for i in range(3)]
    ratios = [s / sigma for s, sigma in zip(scales, sigmas)]
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=0.03)
    assert scales[2] / scales[0] == pytest.approx(80.0, rel=0.03)


def test_gradnorm_toy_determinism_and_drawn_sigmas() -> None:
    a = data.load("gradnorm_toy", seed=5, num_tasks=4, sizes=(20, 5, 5))
    b = data.load("gradnorm_toy", seed=5, num_tasks=4, sizes=(20, 5, 5))
    c = data.load("gradnorm_toy", seed=6, num_tasks=4, sizes=(20, 5, 5))
    assert torch.equal(a.train.inputs, b.train.inputs) and a.info["sigmas"] == b.info["sigmas"]
    assert torch.equal(a.train.targets["t3"], b.train.targets["t3"])
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert len(a.info["sigmas"]) == 4 and all(1.0 <= s <= 100.0 for s in a.info["sigmas"])
    two = data.load("gradnorm_toy", seed=5, num_tasks=2, sizes=(20, 5, 5))
    assert torch.equal(two.info["B"], a.info["B"])  # drawing σ does not shift the other draws
    with pytest.raises(ValueError, match="sigmas must be a sequence of num_tasks=3"):
        data.load("gradnorm_toy", num_tasks=3, sigmas=(1.0, 2.0))


# ---------------------------------------------------------------- registry
def test_registry_names_and_errors() -> None:
    assert data.available() == ["celeba", "census", "cityscapes", "gradnorm_toy", "multidigits",
                                "multimnist", "nyud", "nyuv2", "office31", "office_home",
                                "pascal_context", "qm9", "tabular"]
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'; available: celeba, census, cityscapes"
    ):
        data.load("mnist")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sizes'\]"):
        data.load("multidigits", sizes=(1, 2, 3))
    with pytest.raises(ValueError, match="nyuv2 is read from disk"):
        data.load("nyuv2")
    assert data.options("multidigits")["size"] == 5_000
