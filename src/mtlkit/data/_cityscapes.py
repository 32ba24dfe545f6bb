"""Cityscapes (segmentation, depth) in the preprocessed layout of the MTAN code and LibMTL."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.tasks import Task

_NPY = re.compile(r"^(\d+)\.npy$")


def _count(split_dir: Path, kinds: Sequence[str]) -> int:
    """Samples of a split folder, checking each kind folder holds files 0..n-1."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"cityscapes: split folder {split_dir} does not exist")
    found = {}
    for kind in kinds:
        d = split_dir / kind
        if not d.is_dir():
            raise FileNotFoundError(f"cityscapes: folder {d} does not exist")
        found[kind] = {int(m.group(1)) for p in d.iterdir() if (m := _NPY.match(p.name))}
    n = len(found[kinds[0]])
    if n == 0:
        raise FileNotFoundError(f"cityscapes: no <index>.npy files in {split_dir / kinds[0]}")
    for kind in kinds:
        missing = sorted(set(range(n)) - found[kind])
        if missing:
            raise FileNotFoundError(
                f"cityscapes: missing file {split_dir / kind / f'{missing[0]}.npy'}"
            )
    return n


class CityscapesSplit(Dataset):
    """Samples of one split folder ``{image, label_<C>, depth}/<i>.npy`` (read lazily).

    Files as the MTAN preprocessing writes them (Liu et al., CVPR 2019, arXiv:1803.10704):
    image ``(H, W, 3)`` float in [0, 1], labels ``(H, W)`` class ids stored as floats with -1
    for unlabelled pixels, depth ``(H, W, 1)`` with 0 where unknown. An item is ``(image
    (3, H, W) float32, {"seg": (H, W) int64, "depth": (1, H, W) float32})``.

    Args:
        folder: the split folder.
        num_classes: 7 or 19 (which ``label_<C>`` folder is read).
        indices: the file indices served (default: all).
    """

    def __init__(self, folder: str | Path, num_classes: int = 7,
                 indices: Sequence[int] | None = None) -> None:
        self.folder = Path(folder)
        self.kinds = ("image", f"label_{num_classes}", "depth")
        self.num_classes = num_classes
        n = _count(self.folder, self.kinds)
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, kind: str, index: int, dims: tuple[int, ...]) -> np.ndarray:
        path = self.folder / kind / f"{index}.npy"
        try:
            array = np.load(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"cityscapes: missing file {path}") from None
        except ValueError as err:
            raise ValueError(f"cityscapes: {path} is not a .npy array ({err})") from None
        if array.ndim not in dims:
            raise ValueError(f"cityscapes: {path} has shape {array.shape}; expected "
                             f"{' or '.join(f'{d} dimensions' for d in dims)}")
        return array

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        idx = self.indices[i]
        image = self._load("image", idx, (3,))
        if image.shape[-1] != 3:
            raise ValueError(f"cityscapes: {self.folder / 'image' / f'{idx}.npy'} has shape "
                             f"{image.shape}; expected (H, W, 3)")
        label = np.rint(self._load(self.kinds[1], idx, (2,))).astype(np.int64)
        bad = (label < -1) | (label >= self.num_classes)
        if bad.any():
            raise ValueError(f"cityscapes: {self.folder / self.kinds[1] / f'{idx}.npy'} holds "
                             f"label {int(label[bad][0])}; expected -1..{self.num_classes - 1}")
        depth = self._load("depth", idx, (2, 3))
        depth = depth[None] if depth.ndim == 2 else np.moveaxis(depth, -1, 0)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))).float(), {
            "seg": torch.from_numpy(label),
            "depth": torch.from_numpy(np.ascontiguousarray(depth)).float(),
        }


@register("cityscapes")
def cityscapes(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    num_classes: int = 7,
    val_fraction: float = 0.1,
    model: str = "segnet_mtan",
    model_options: dict | None = None,
) -> DatasetBundle:
    """Cityscapes with two tasks: ``seg`` (7 classes, or 19) and ``depth``, at 128x256.

    Reads the MTAN / LibMTL preprocessed files: ``{root}/train/`` (2,975 images) and
    ``{root}/val/`` (500), each with ``image/``, ``label_7/`` (or ``label_19/``) and
    ``depth/`` holding ``<i>.npy``. The ``val`` folder is the split papers report on (Nash-MTL,
    FAMO, LibMTL), so it is ``test`` here, and ``val`` (model selection) is a seeded
    ``val_fraction`` of the training images. Unlabelled pixels are -1 and ignored by the loss
    and metrics; depth 0 is unknown. No augmentation.

    Protocols: SegNet-MTAN (``model="segnet_mtan"``, Nash-MTL / FAMO) or a dilated ResNet-50
    with ASPP heads (``model="resnet50_deeplab"``, LibMTL).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        seed: seeds which training images are held out for validation.
        num_classes: 7 (the MTL benchmark) or 19.
        val_fraction: fraction of the training images held out, in (0, 1).
        model: the registered model to train.
        model_options: options of that model (e.g. SegNet-MTAN's ``filters``).

    Raises:
        ValueError: no root, a bad option; when read, a malformed array.
        FileNotFoundError: the root, a split or kind folder, or an indexed file is missing.
    """
    path = require_root("cityscapes", root)
    if num_classes not in (7, 19):
        raise ValueError(f"num_classes must be 7 or 19, got {num_classes!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0 < val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    train_all = CityscapesSplit(path / "train", num_classes)
    test = CityscapesSplit(path / "val", num_classes)
    n = len(train_all)
    if n < 2:
        raise ValueError(f"cityscapes: {path / 'train'} holds {n} sample; need 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    train = CityscapesSplit(path / "train", num_classes, train_idx)
    val = CityscapesSplit(path / "train", num_classes, val_idx)
    h, w = np.load(path / "train" / "image" / "0.npy", mmap_mode="r").shape[:2]
    tasks = (Task.segmentation("seg", num_classes, ignore_index=-1), Task.depth("depth"))
    info = {"root": str(path), "seed": seed, "val_indices": val_idx, "num_classes": num_classes,
            "layout": "MTAN preprocessed (arXiv:1803.10704); test = the 'val' folder"}
    return DatasetBundle("cityscapes", train, val, test, tasks, (3, int(h), int(w)), info,
                         model=model, model_options=dict(model_options or {}))
