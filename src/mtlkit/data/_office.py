"""Office-31 and Office-Home from LibMTL's image lists: one task (and one input set) per domain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._multi_input import MultiInputDataset
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.tasks import Task

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image_list(path: Path, num_classes: int, name: str) -> list[tuple[str, int]]:
    """``(relative image path, label)`` from a LibMTL list file of lines ``path label``."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: missing image list {path}")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        file, _, label = line.strip().rpartition(" ")
        try:
            y = int(label)
        except ValueError:
            y = -1
        if not file or not 0 <= y < num_classes:
            raise ValueError(f"{name}: {path} line {number} must be '<image path> <label in "
                             f"0..{num_classes - 1}>', got {line!r}")
        items.append((file, y))
    if not items:
        raise ValueError(f"{name}: image list {path} is empty")
    return items


class ImageListDataset(Dataset):
    """Images of one task listed as ``path label``, resized and ImageNet-normalised as LibMTL.

    An item is ``(image (3, S, S) float32, {task: int64 label})``.

    Args:
        root: the folder the list's paths are relative to.
        items: ``(path, label)`` pairs.
        task: the task name (the domain).
        size: the side images are resized to (bilinear).
        name: the dataset name, for messages.
    """

    def __init__(self, root: Path, items: Sequence[tuple[str, int]], task: str, size: int,
                 name: str) -> None:
        self.root, self.items, self.task, self.size, self.name = root, list(items), task, size, name
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        from PIL import Image, UnidentifiedImageError

        file, label = self.items[i]
        path = self.root / file
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: missing image {path}")
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.float32) / 255.0
        except UnidentifiedImageError:
            raise ValueError(f"{self.name}: {path} is not an image") from None
        x = (torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) - self.mean) / self.std
        return x, {self.task: torch.tensor(label, dtype=torch.int64)}


def _office(name: str, domains: Sequence[str], num_classes: int, root: str | Path | None,
            image_size: int, lists: str | None, pretrained: str | None,
            model: str) -> DatasetBundle:
    path = require_root(name, root)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    folder = path / lists if lists is not None else path
    if lists is None and not (folder / f"{domains[0]}_train.txt").is_file():
        libmtl = path / "data_txt" / ("office-31" if name == "office31" else "office-home")
        folder = libmtl if libmtl.is_dir() else folder
    per_split = {}
    for split in SPLITS:
        per_split[split] = MultiInputDataset({
            d: ImageListDataset(path, read_image_list(folder / f"{d}_{split}.txt", num_classes,
                                                      name), d, image_size, name)
            for d in domains
        })
    tasks = tuple(Task.classification(d, num_classes) for d in domains)
    info = {"root": str(path), "lists": str(folder), "multi_input": True,
            "sizes": {s: ds.sizes for s, ds in per_split.items()},
            "source": "LibMTL image lists (Lin & Zhang, JMLR 2023, arXiv:2203.14338)"}
    options = {} if pretrained is None or model != "resnet18_multi_input" else {
        "pretrained": pretrained}
    return DatasetBundle(name, per_split["train"], per_split["val"], per_split["test"], tasks,
                         (3, image_size, image_size), info, model=model,
                         model_options=options)


@register("office31")
def office31(root: str | Path | None = None, seed: int = 0, *, image_size: int = 224,
             lists: str | None = None, pretrained: str | None = None,
             model: str = "resnet18_multi_input") -> DatasetBundle:
    """Office-31 (Saenko et al., ECCV 2010): 31 classes, one task per domain (``amazon``,
    ``dslr``, ``webcam``), multi-input: each domain's task has its own images.

    Reads LibMTL's lists ``{domain}_{train,val,test}.txt`` (lines ``path label``, 60/20/20 of
    each domain) from ``lists`` (relative to ``root``), from ``root`` itself, or from
    ``root/data_txt/office-31``; image paths are relative to ``root``. Images are resized to
    ``image_size`` (224 as LibMTL) and normalised with the ImageNet mean and std.

    Args:
        root: the image root.
        seed: unused (the splits are LibMTL's lists).
        image_size: resize side.
        lists: the folder of the list files, relative to ``root``.
        pretrained: a torchvision-format ResNet-18 state dict file for the default model
            (ImageNet weights as LibMTL; never downloaded).
        model: the registered model (LibMTL's ResNet-18 by default).

    Raises:
        FileNotFoundError: the root or a list file is missing (a missing image when read).
        ValueError: a malformed list line.
    """
    return _office("office31", ("amazon", "dslr", "webcam"), 31, root, image_size, lists,
                   pretrained, model)


@register("office_home")
def office_home(root: str | Path | None = None, seed: int = 0, *, image_size: int = 224,
                lists: str | None = None, pretrained: str | None = None,
             model: str = "resnet18_multi_input") -> DatasetBundle:
    """Office-Home (Venkateswara et al., CVPR 2017): 65 classes, one task per domain (``Art``,
    ``Clipart``, ``Product``, ``Real_World``), multi-input; files as :func:`office31` (LibMTL's
    lists, or ``root/data_txt/office-home``).

    Args:
        root: the image root.
        seed: unused (the splits are LibMTL's lists).
        image_size: resize side.
        lists: the folder of the list files, relative to ``root``.
        pretrained: a torchvision-format ResNet-18 state dict file for the default model.
        model: the registered model (LibMTL's ResNet-18 by default).

    Raises:
        FileNotFoundError: the root or a list file is missing.
        ValueError: a malformed list line.
    """
    return _office("office_home", ("Art", "Clipart", "Product", "Real_World"), 65, root,
                   image_size, lists, pretrained, model)
