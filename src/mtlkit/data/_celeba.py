"""CelebA: 40 binary face attributes, from the official annotation files and aligned JPEGs."""

from __future__ import annotations

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

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLITS = ("train", "val", "test")  # partition codes 0, 1, 2


def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, file names, (n, A) uint8 0/1 labels) from ``list_attr_celeba.txt``."""
    if not path.is_file():
        raise FileNotFoundError(f"celeba: missing file {path}")
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"celeba: {path} must start with a count line and an attribute-name line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise ValueError(
            f"celeba: {path} line 1 must be the number of images, got {lines[0]!r}"
        ) from None
    names = lines[1].split()
    files: list[str] = []
    rows: list[list[int]] = []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise ValueError(
                f"celeba: {path} line {number} has {len(parts) - 1} values, expected {len(names)}"
            )
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"celeba: {path} line {number} holds a non-integer value") from None
        if any(v not in (-1, 1) for v in values):
            raise ValueError(f"celeba: {path} line {number}: attribute values must be -1 or 1")
        files.append(parts[0])
        rows.append(values)
    if len(files) != count:
        raise ValueError(f"celeba: {path} announces {count} images but lists {len(files)}")
    labels = ((np.asarray(rows, dtype=np.int8).reshape(len(rows), len(names)) + 1) // 2).astype(
        np.uint8
    )
    return names, files, labels


def _read_partition(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(f"celeba: missing file {path}")
    out: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"celeba: {path} line {number} must be '<file> <0|1|2>', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return image_size, image_size
    if (
        isinstance(image_size, (list, tuple))
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(
        f"image_size must be None, a positive int or (height, width), got {image_size!r}"
    )


class CelebASplit(Dataset):
    """Aligned CelebA images with their attribute labels (read lazily with PIL).

    An item is ``(image, targets)``: ``image`` is ``(3, H, W)`` float32 in [0, 1] (resized
    bilinearly to ``size`` if given); ``targets`` is ``{"attributes": (A,) float32 0/1}`` or,
    with ``per_attribute``, ``{attribute name: int64 0/1}`` per attribute.

    Args:
        image_dir: the ``img_align_celeba`` folder.
        files: image file names.
        labels: ``(n, A)`` 0/1 labels.
        names: the A attribute names.
        size: ``(height, width)`` to resize to, or None.
        per_attribute: one binary target per attribute instead of one vector.
    """

    def __init__(
        self,
        image_dir: Path,
        files: Sequence[str],
        labels: np.ndarray,
        names: Sequence[str],
        size: tuple[int, int] | None,
        per_attribute: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.files = list(files)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        self.names = list(names)
        self.size = size
        self.per_attribute = per_attribute

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, i: int) -> Tensor:
        """The ``i``-th image as ``(3, H, W)`` float32 in [0, 1]."""
        from PIL import Image

        path = self.image_dir / self.files[i]
        if not path.is_file():
            raise FileNotFoundError(f"celeba: missing image {path}")
        with Image.open(path) as img:
            img = img.convert("RGB")
            if self.size is not None:
                img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        row = self.labels[i]
        if self.per_attribute:
            targets = {n: row[j].long() for j, n in enumerate(self.names)}
        else:
            targets = {"attributes": row.float()}
        return self.load_image(i), targets


@register("celeba")
def celeba(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    image_size: int | Sequence[int] | None = 64,
    attributes: Sequence[str] | None = None,
    per_attribute: bool = False,
) -> DatasetBundle:
    """CelebA (Liu et al., ICCV 2015) with its 40 binary attributes and official splits.

    Reads ``{root}/list_attr_celeba.txt`` (a count line, the attribute names, then one line
    per image with values -1/1, mapped to 0/1), ``{root}/list_eval_partition.txt`` (0 = train,
    1 = val, 2 = test) and ``{root}/img_align_celeba/*.jpg``. Images are resized to
    ``image_size`` (64x64 by default, as in MGDA-UB, Sener and Koltun, arXiv:1810.04650) and
    scaled to [0, 1], without mean/std normalisation.

    Tasks: one :meth:`Task.multilabel` task ``attributes`` over the selected attributes (per
    attribute accuracy and F1, averaged), or with ``per_attribute=True`` one binary
    :meth:`Task.classification` task per attribute, named by the attribute (the 40-task
    setting of the MTL literature; the targets are 0/1 class ids).

    Args:
        root: the folder holding the two text files and ``img_align_celeba``.
        seed: unused (the splits are the official ones); kept for the common signature.
        image_size: ``(height, width)``, one int for a square, or None for the original size.
        attributes: names of the attributes to keep (default all 40), in this order.
        per_attribute: one task per attribute.

    Raises:
        ValueError: no root, malformed annotation files, unknown attribute.
        FileNotFoundError: the root, an annotation file or the image folder is missing (a
            missing image is reported when it is read).
    """
    path = require_root("celeba", root)
    size = _size(image_size)
    names, files, labels = _read_attributes(path / ATTR_FILE)
    partition = _read_partition(path / PARTITION_FILE)
    image_dir = path / IMAGE_DIR
    if not image_dir.is_dir():
        raise FileNotFoundError(f"celeba: image folder {image_dir} does not exist")
    if attributes is not None:
        unknown = [a for a in attributes if a not in names]
        if unknown or not attributes:
            raise ValueError(
                f"attributes: unknown {unknown or 'empty selection'}; available: {names}"
            )
        cols = [names.index(a) for a in attributes]
        names, labels = list(attributes), labels[:, cols]
    codes = []
    for f in files:
        if f not in partition:
            raise ValueError(f"celeba: image {f} has no entry in {path / PARTITION_FILE}")
        codes.append(partition[f])
    codes_arr = np.asarray(codes)
    splits = {}
    for code, split in enumerate(SPLITS):
        rows = np.flatnonzero(codes_arr == code)
        if len(rows) == 0:
            raise ValueError(f"celeba: the {split} partition ({code}) is empty")
        splits[split] = CelebASplit(
            image_dir, [files[r] for r in rows], labels[rows], names, size, per_attribute
        )
    if size is None:
        from PIL import Image

        with Image.open(image_dir / files[0]) as img:
            size = (img.height, img.width)
    if per_attribute:
        tasks = tuple(Task.classification(n, 2) for n in names)
    else:
        tasks = (Task.multilabel("attributes", len(names)),)
    info = {"root": str(path), "attributes": names, "sizes": {s: len(d) for s, d in splits.items()}}
    return DatasetBundle(
        "celeba", splits["train"], splits["val"], splits["test"], tasks, (3, *size), info
    )
