"""MultiMNIST built deterministically from the MNIST idx files, as Sener & Koltun (2018)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from mtlkit.data._bundle import DatasetBundle, MultiTaskTensorDataset
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.tasks import Task

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics, the normalisation of the MGDA code


def _open(root: Path, name: str) -> bytes:
    for candidate in (root / name, root / f"{name}.gz", root / "raw" / name,
                      root / "raw" / f"{name}.gz"):
        if candidate.is_file():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
    raise FileNotFoundError(f"multimnist: missing file {root / name} (or {name}.gz, or under raw/)")


def read_idx(root: Path, name: str, dims: int) -> np.ndarray:
    """An MNIST idx file: big-endian magic ``0x0000 08 <dims>``, ``dims`` int32 sizes, uint8
    data. ``dims`` is 3 for images, 1 for labels."""
    raw = _open(root, name)
    where = root / name
    if len(raw) < 4 + 4 * dims or raw[:3] != b"\x00\x00\x08" or raw[3] != dims:
        raise ValueError(f"multimnist: {where} is not an idx file of uint8 with {dims} "
                         f"dimension(s) (magic 0x{2048 + dims:08x})")
    shape = tuple(int(v) for v in np.frombuffer(raw[4:4 + 4 * dims], dtype=">i4"))
    data = np.frombuffer(raw[4 + 4 * dims:], dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"multimnist: {where} announces shape {shape} but holds {data.size} "
                         "values")
    return data.reshape(shape)


def overlay(left: np.ndarray, right: np.ndarray) -> torch.Tensor:
    """Sener & Koltun's MultiMNIST canvas: ``left`` at the top-left of a 36x36 canvas, ``right``
    shifted 6 pixels down and right, their maximum where they overlap, resized bilinearly to
    28x28; returns uint8 ``(N, 28, 28)``.

    Example:
        >>> import numpy as np
        >>> a = np.zeros((1, 28, 28), np.uint8)
        >>> overlay(a, a + 255).shape
        torch.Size([1, 28, 28])
    """
    n, h, w = left.shape
    canvas = torch.zeros(n, 1, h + 8, w + 8)
    canvas[:, 0, 6:6 + h, 6:6 + w] = torch.from_numpy(right.astype(np.float32))
    canvas[:, 0, :h, :w] = torch.maximum(canvas[:, 0, :h, :w],
                                         torch.from_numpy(left.astype(np.float32)))
    small = F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True)
    return small[:, 0].round().clamp(0, 255).to(torch.uint8)


@register("multimnist")
def multimnist(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    pairing_seed: int = 0,
) -> DatasetBundle:
    """MultiMNIST: two MNIST digits on one 28x28 image; tasks ``left`` and ``right``.

    The construction of *Multi-Task Learning as Multi-Objective Optimization* (Sener and
    Koltun, NeurIPS 2018, arXiv:1810.04650; their code's loader): image ``i`` of a split is the
    left digit; the right digit is image ``perm[i]`` of the same split for a random permutation
    (seeded by ``pairing_seed``, so the data set is the same on every machine), placed 6 pixels
    down and right on a 36x36 canvas, the maximum where they overlap, resized to 28x28. Pixels
    are scaled to [0, 1] and normalised with MNIST's mean 0.1307 and std 0.3081, as their code.
    The 60,000 training images give ``train`` and ``val`` (a seeded ``val_fraction``), the
    10,000 test images ``test``.

    Reads ``{root}/train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (``.gz`` or under ``raw/`` as well).

    .. note:: Their code resized with ``scipy.misc.imresize`` (removed from SciPy); this uses
       antialiased bilinear resizing, so pixels differ slightly.

    Args:
        root: the folder of the idx files.
        seed: seeds which training images are held out for validation.
        val_fraction: fraction of the training images held out, in (0, 1).
        pairing_seed: seeds the choice of the right digit.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a malformed idx file, or image and label counts that differ.
    """
    path = require_root("multimnist", root)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0 < val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    parts = {}
    for split, (images_file, labels_file) in FILES.items():
        images, labels = read_idx(path, images_file, 3), read_idx(path, labels_file, 1)
        if len(images) != len(labels):
            raise ValueError(f"multimnist: {path / images_file} has {len(images)} images but "
                             f"{path / labels_file} {len(labels)} labels")
        g = torch.Generator().manual_seed(pairing_seed + (split == "test"))
        perm = torch.randperm(len(images), generator=g).numpy()
        x = (overlay(images, images[perm]).float().unsqueeze(1) / 255.0 - MEAN) / STD
        parts[split] = (x, torch.from_numpy(labels.astype(np.int64)),
                        torch.from_numpy(labels[perm].astype(np.int64)))
    x, left, right = parts["train"]
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    if n < 2:
        raise ValueError(f"multimnist: need 2 training images or more, found {n}")
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values

    def subset(idx: torch.Tensor) -> MultiTaskTensorDataset:
        return MultiTaskTensorDataset(x[idx], {"left": left[idx], "right": right[idx]})

    tx, tl, tr = parts["test"]
    tasks = (Task.classification("left", 10), Task.classification("right", 10))
    info = {"root": str(path), "seed": seed, "pairing_seed": pairing_seed,
            "source": "Sener & Koltun, NeurIPS 2018, arXiv:1810.04650"}
    return DatasetBundle(
        "multimnist", subset(train_idx), subset(val_idx),
        MultiTaskTensorDataset(tx, {"left": tl, "right": tr}), tasks, (1, 28, 28), info,
        model="multilenet",
    )
