"""NYUD-v2 with four dense tasks (40-class segmentation, depth, normals, edges), in the layout of
the dense-prediction survey's public setup."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._dense_tasks import depth_rmse_task, edge_task
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._pascal import (
    check_size,
    check_task_list,
    load_png,
    load_rgb,
    read_ids,
    resize_map,
    split_train_val,
)
from mtlkit.data._registry import register
from mtlkit.tasks import NORMAL_LOSSES, Task

NYUD_TASKS = ("semseg", "depth", "normals", "edge")


class NYUDSplit(Dataset):
    """Samples of NYUD-v2 in the survey's ``NYUD_MT`` layout (Vandenhende et al. 2021,
    arXiv:2004.13379):

    - ``images/{id}.jpg`` (or ``.png``): the image, normalised with the ImageNet mean and std;
    - ``segmentation/{id}.png``: 40 classes stored as 1..40, 0 unlabelled; ``semseg`` is
      ``label - 1`` with -1 unlabelled;
    - ``depth/{id}.npy``: depth ``(H, W)`` in metres, 0 where missing;
    - ``normals/{id}.npy``: unit normals ``(H, W, 3)``, zero vectors where missing;
    - ``edge/{id}.npy``: binary edge map ``(H, W)``.

    An item is ``(image, {task: target})``, maps resized to ``size`` when given (nearest for
    labels).
    """

    def __init__(
        self,
        root: str | Path,
        ids: Sequence[str],
        tasks: Sequence[str] = NYUD_TASKS,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.tasks = tuple(tasks)
        self.size = size
        for i in self.ids:
            for path in self._paths(i).values():
                if not path.is_file():
                    raise FileNotFoundError(f"nyud: missing file {path}")

    def _paths(self, i: str) -> dict[str, Path]:
        image = self.root / "images" / f"{i}.jpg"
        if not image.is_file() and (self.root / "images" / f"{i}.png").is_file():
            image = self.root / "images" / f"{i}.png"
        paths = {"image": image}
        folder = {"semseg": ("segmentation", "png"), "depth": ("depth", "npy"),
                  "normals": ("normals", "npy"), "edge": ("edge", "npy")}
        for t in self.tasks:
            d, ext = folder[t]
            paths[t] = self.root / d / f"{i}.{ext}"
        return paths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        i = self.ids[index]
        paths = self._paths(i)
        image = load_rgb(paths["image"])
        y: dict[str, Tensor] = {}
        if "semseg" in self.tasks:
            y["semseg"] = torch.from_numpy(load_png(paths["semseg"]).astype(np.int64) - 1)[None]
        if "depth" in self.tasks:
            d = np.load(paths["depth"]).astype(np.float32)
            y["depth"] = torch.from_numpy(d.reshape(d.shape[0], d.shape[1]))[None]
        if "normals" in self.tasks:
            n = np.load(paths["normals"]).astype(np.float32)
            y["normals"] = torch.from_numpy(np.ascontiguousarray(n)).permute(2, 0, 1)
        if "edge" in self.tasks:
            e = np.load(paths["edge"]).astype(np.float32)
            y["edge"] = torch.from_numpy((e > 0.5).astype(np.float32))[None]
        for t, v in y.items():
            if v.shape[-2:] != image.shape[-2:]:
                raise ValueError(f"nyud: the {t} map of {i} is {tuple(v.shape[-2:])}, the image "
                                 f"{tuple(image.shape[-2:])}")
        image = resize_map(image, self.size, "bilinear")
        y = {t: resize_map(v, self.size, "nearest") for t, v in y.items()}
        if "semseg" in y:
            y["semseg"] = y["semseg"][0]
        return image, y


def nyud_tasks(tasks: Sequence[str], normals_loss: str = "l1") -> tuple[Task, ...]:
    """The survey's NYUD-v2 tasks, in the order asked.

    .. note:: ``normals`` trains with ``normals_loss``: ``l1`` (default), the survey's L1 on
       the normalised prediction (:class:`~mtlkit.tasks.NormalL1Loss`), or ``cosine``
       (``1 - cos``). Edges use :class:`~mtlkit.data._dense_tasks.BalancedBCELoss`
       (positive weight 0.95, as the survey's code).
    """
    if normals_loss not in NORMAL_LOSSES:
        raise ValueError(f"normals_loss must be one of {sorted(NORMAL_LOSSES)}, got "
                         f"{normals_loss!r}")
    table = {
        "semseg": lambda: Task.segmentation("semseg", 40, ignore_index=-1),
        "depth": lambda: depth_rmse_task("depth"),
        "normals": lambda: Task.normals("normals", loss=normals_loss),
        "edge": lambda: edge_task("edge"),
    }
    return tuple(table[t]() for t in tasks)


@register("nyud")
def nyud(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    tasks: Sequence[str] = NYUD_TASKS,
    size: Sequence[int] | None = None,
    val_fraction: float = 0.1,
    normals_loss: str = "l1",
) -> DatasetBundle:
    """NYUD-v2 with the survey's four tasks: ``semseg`` (40 classes), ``depth`` (RMSE),
    ``normals`` (mean angle), ``edge`` (odsF); see :class:`NYUDSplit` for the files.

    This is ``nyuv2`` (MTAN's 13-class, 288 x 384 files) extended with edges, in the survey's
    setup instead: ``gt_sets/train.txt`` (795 images) is split into ``train`` and a seeded
    ``val_fraction`` for model selection, and ``gt_sets/val.txt`` (654 images), the split the
    survey reports on, becomes ``test``. The bundle's default model is ``mti_net``.

    Args:
        root: the ``NYUD_MT`` folder.
        seed: seeds the validation hold-out.
        tasks: a subset of the four tasks, in output order.
        size: ``(H, W)`` to resize every item to, or None (the files' size).
        val_fraction: fraction of the training images held out, in (0, 1).
        normals_loss: ``l1`` (the survey's) or ``cosine`` (``1 - cos``).

    Raises:
        ValueError: no root, an unknown task, a bad size, fraction or ``normals_loss``.
        FileNotFoundError: a split file or an image's file is missing (the message names it).
    """
    path = require_root("nyud", root)
    chosen = check_task_list(tasks, NYUD_TASKS, "nyud")
    task_list = nyud_tasks(chosen, normals_loss)
    shape = check_size(size, "nyud")
    train_ids = read_ids(path / "gt_sets" / "train.txt", "nyud")
    test_ids = read_ids(path / "gt_sets" / "val.txt", "nyud")
    train_ids, val_ids = split_train_val(train_ids, seed, val_fraction, "nyud")
    train = NYUDSplit(path, train_ids, chosen, shape)
    h, w = shape if shape is not None else train[0][0].shape[-2:]
    info = {"root": str(path), "seed": seed, "val_ids": val_ids,
            "layout": "NYUD_MT of the dense-prediction survey (arXiv:2004.13379); "
                      "test = gt_sets/val.txt"}
    return DatasetBundle(
        "nyud", train, NYUDSplit(path, val_ids, chosen, shape),
        NYUDSplit(path, test_ids, chosen, shape), task_list, (3, int(h), int(w)),
        info, model="mti_net",
    )
