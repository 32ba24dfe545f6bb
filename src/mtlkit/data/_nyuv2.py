"""NYUv2 (13-class segmentation, depth, surface normals) in the MTAN preprocessed layout."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._registry import register
from mtlkit.tasks import Task

KINDS = ("image", "label", "depth", "normal")
_NPY = re.compile(r"^(\d+)\.npy$")


def require_root(name: str, root: str | Path | None) -> Path:
    """The dataset folder as a Path; ValueError if not given, FileNotFoundError if absent."""
    if root is None:
        raise ValueError(f"{name} is read from disk: pass root=<folder holding the {name} files>")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: data folder {path} does not exist")
    return path


def _count(split_dir: Path) -> int:
    """Number of samples of a split folder, checking every kind has files 0..n-1."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"nyuv2: split folder {split_dir} does not exist")
    found: dict[str, set[int]] = {}
    for kind in KINDS:
        d = split_dir / kind
        if not d.is_dir():
            raise FileNotFoundError(f"nyuv2: folder {d} does not exist")
        found[kind] = {int(m.group(1)) for p in d.iterdir() if (m := _NPY.match(p.name))}
    n = len(found["image"])
    if n == 0:
        raise FileNotFoundError(f"nyuv2: no <index>.npy files in {split_dir / 'image'}")
    for kind in KINDS:
        missing = sorted(set(range(n)) - found[kind])
        if missing:
            raise FileNotFoundError(f"nyuv2: missing file {split_dir / kind / f'{missing[0]}.npy'}")
    return n


class NYUv2Split(Dataset):
    """Samples of one NYUv2 split folder ``{split}/{image,label,depth,normal}/{i}.npy``.

    Files as written by the MTAN preprocessing (Liu et al., CVPR 2019, arXiv:1803.10704): image
    ``(H, W, 3)`` floats, label ``(H, W)`` class ids stored as floats with -1 for unlabelled
    pixels, depth ``(H, W, 1)`` (or ``(H, W)``) with 0 where missing, normal ``(H, W, 3)``
    with zero vectors where missing. An item is ``(image (3, H, W) float32, {"seg": (H, W) int64,
    "depth": (1, H, W) float32, "normal": (3, H, W) float32})``. Files are read lazily.

    Args:
        folder: the split folder.
        indices: the file indices this dataset serves (default: all).
    """

    def __init__(self, folder: str | Path, indices: Sequence[int] | None = None) -> None:
        self.folder = Path(folder)
        n = _count(self.folder)
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices {bad[:3]} are outside the {n} samples of {self.folder}")

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, kind: str, index: int) -> np.ndarray:
        path = self.folder / kind / f"{index}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"nyuv2: missing file {path}")
        return np.load(path)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        idx = self.indices[i]
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._load("image", idx), -1, 0)))
        label = torch.from_numpy(np.rint(self._load("label", idx)).astype(np.int64))
        depth = self._load("depth", idx)
        depth = depth[None] if depth.ndim == 2 else np.moveaxis(depth, -1, 0)
        normal = np.moveaxis(self._load("normal", idx), -1, 0)
        return image.float(), {
            "seg": label,
            "depth": torch.from_numpy(np.ascontiguousarray(depth)).float(),
            "normal": torch.from_numpy(np.ascontiguousarray(normal)).float(),
        }


@register("nyuv2")
def nyuv2(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    num_classes: int = 13,
    ignore_index: int = -1,
) -> DatasetBundle:
    """NYUv2 with three tasks: ``seg`` (13 classes), ``depth`` and ``normal``.

    Reads the MTAN preprocessed files (288x384): ``{root}/train/...`` (795 images) and
    ``{root}/val/...`` (654 images). The MTAN ``val`` folder is the standard NYUv2 test split
    that papers report on, so it becomes ``test`` here, and ``val`` (for model selection) is a
    seeded ``val_fraction`` of the training images, so that no model is ever selected on the
    test split. No augmentation is applied.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        seed: seeds which training images are held out for validation.
        val_fraction: fraction of the training images held out, in (0, 1).
        num_classes: segmentation classes (13 in the MTAN files).
        ignore_index: label of unlabelled pixels (-1 in the MTAN files).

    Raises:
        ValueError: no root.
        FileNotFoundError: the root, a split or kind folder, or an indexed file is missing.
    """
    path = require_root("nyuv2", root)
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    train_dir, test_dir = path / "train", path / "val"
    n = _count(train_dir)
    if n < 2:
        raise ValueError(
            f"nyuv2: {train_dir} holds {n} sample; need 2 to hold one out for validation"
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    train = NYUv2Split(train_dir, train_idx)
    val = NYUv2Split(train_dir, val_idx)
    test = NYUv2Split(test_dir)
    h, w = np.load(train_dir / "image" / "0.npy", mmap_mode="r").shape[:2]
    tasks = (
        Task.segmentation("seg", num_classes, ignore_index=ignore_index),
        Task.depth("depth"),
        Task.normals("normal"),
    )
    info = {
        "root": str(path),
        "seed": seed,
        "val_indices": val_idx,
        "layout": "MTAN preprocessed (arXiv:1803.10704); test = the MTAN 'val' folder",
    }
    return DatasetBundle("nyuv2", train, val, test, tasks, (3, int(h), int(w)), info)
