"""PASCAL-Context with five dense tasks, from the files of the dense-prediction survey's setup."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import io as sio
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._dense_tasks import edge_task, saliency_task
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.tasks import NORMAL_LOSSES, Task

PASCAL_TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
IGNORE = 255
PERSON = 15  # PASCAL VOC class index of "person"
#: PASCAL-Part person part names -> the six parts of the survey's human-parts task (0: background)
HUMAN_PARTS = {
    **dict.fromkeys(
        ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1
    ),
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5,
    "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_ids(path: Path, name: str) -> list[str]:
    """The image ids listed one per line in ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: split file {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{name}: split file {path} lists no image")
    return ids


def load_rgb(path: Path) -> Tensor:
    """An RGB image as ``(3, H, W)`` float32, normalised with the ImageNet mean and std."""
    from PIL import Image  # extra mtlkit[cli]: imported when an image is read

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def resize_map(x: Tensor, size: tuple[int, int] | None, mode: str) -> Tensor:
    """Resize a ``(C, H, W)`` map (``nearest`` for labels, ``bilinear`` for images)."""
    if size is None or tuple(x.shape[-2:]) == size:
        return x
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None].float(), size=size, mode=mode, **kw)[0].to(x.dtype)


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label: one-pixel-wide region borders."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def _field(record: Any, name: str) -> Any:
    """A field of a MATLAB struct as ``scipy.io.loadmat`` returns it (1x1 arrays unwrapped)."""
    value = record[name]
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.flat[0]
    return value


def human_parts(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The six-part map of every person with part annotations in a PASCAL-Part ``.mat`` file
    (``anno.objects(j).class_ind == 15``, ``parts(k).part_name``, ``parts(k).mask``), and
    whether the image has one."""
    anno = sio.loadmat(path)["anno"][0, 0]
    objects = anno["objects"]
    target = np.zeros(shape, dtype=np.int64)
    found = False
    for obj in objects.flat:
        parts = obj["parts"]
        if int(np.asarray(_field(obj, "class_ind")).ravel()[0]) != PERSON or parts.size == 0:
            continue
        found = True
        for part in parts.flat:
            name = str(np.asarray(_field(part, "part_name")).ravel()[0])
            if name not in HUMAN_PARTS:
                raise ValueError(f"pascal_context: {path}: unknown person part {name!r}")
            target[np.asarray(_field(part, "mask")).astype(bool)] = HUMAN_PARTS[name]
    return target, found


class PascalContextSplit(Dataset):
    """Samples of PASCAL-Context for the survey's five dense tasks.

    Files (the survey's public ``PASCAL_MT`` setup, Vandenhende et al. 2021,
    arXiv:2004.13379, after Maninis, Radosavovic, Kokkinos, CVPR 2019, arXiv:1904.08918):

    - ``JPEGImages/{id}.jpg``: the image (normalised with the ImageNet mean and std);
    - ``semseg/VOC12/{id}.png`` or ``semseg/pascal-context/{id}.png``: ``semseg``, 21 classes,
      255 unlabelled;
    - ``human_parts/{id}.mat``: PASCAL-Part annotations, turned into ``human_parts`` (person
      parts grouped into 6 classes, 0 background); images without an annotated person carry
      a False per-sample mask for this task (no loss, no metric);
    - ``sal_distill/{id}.png``: ``sal``, grey level / 255 > 0.5;
    - ``normals_distill/{id}.png``: ``normals``, ``2 x / 255 - 1``, kept only on pixels whose
      ``pascal-context/trainval/{id}.mat`` ``LabelMap`` class is in ``normals_classes``
      (zero vectors elsewhere, which the normals loss and metrics skip);
    - ``pascal-context/trainval/{id}.mat``: ``edge``, the borders of the ``LabelMap`` regions.

    An item is ``(image, {task: target}, {"human_parts": has_person})`` with every map resized
    to ``size`` (nearest for labels, bilinear for the image).

    Args:
        root: the dataset folder.
        ids: image ids.
        tasks: which of the five tasks to load.
        size: ``(H, W)`` of every item, or None to keep each image's size.
        normals_classes: ``LabelMap`` classes with valid normals (None: every labelled pixel).
    """

    def __init__(
        self,
        root: str | Path,
        ids: Sequence[str],
        tasks: Sequence[str] = PASCAL_TASKS,
        size: tuple[int, int] | None = (512, 512),
        normals_classes: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.tasks = tuple(tasks)
        self.size = size
        self.normals_classes = None if normals_classes is None else np.asarray(normals_classes)
        for i in self.ids:
            for path in self._paths(i).values():
                if not path.is_file():
                    raise FileNotFoundError(f"pascal_context: missing file {path}")

    def _semseg_path(self, i: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{i}.png"
        return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{i}.png"

    def _paths(self, i: str) -> dict[str, Path]:
        paths = {"image": self.root / "JPEGImages" / f"{i}.jpg"}
        if "semseg" in self.tasks:
            paths["semseg"] = self._semseg_path(i)
        if "human_parts" in self.tasks:
            paths["human_parts"] = self.root / "human_parts" / f"{i}.mat"
        if "sal" in self.tasks:
            paths["sal"] = self.root / "sal_distill" / f"{i}.png"
        if "normals" in self.tasks:
            paths["normals"] = self.root / "normals_distill" / f"{i}.png"
        if "normals" in self.tasks or "edge" in self.tasks:
            paths["labelmap"] = self.root / "pascal-context" / "trainval" / f"{i}.mat"
        return paths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        i = self.ids[index]
        paths = self._paths(i)
        image = load_rgb(paths["image"])
        shape = (int(image.shape[1]), int(image.shape[2]))
        y: dict[str, Tensor] = {}
        mask: dict[str, Tensor] = {}
        labelmap = sio.loadmat(paths["labelmap"])["LabelMap"] if "labelmap" in paths else None
        if "semseg" in self.tasks:
            y["semseg"] = torch.from_numpy(load_png(paths["semseg"]).astype(np.int64))[None]
        if "human_parts" in self.tasks:
            parts, has_person = human_parts(paths["human_parts"], shape)
            y["human_parts"] = torch.from_numpy(parts)[None]
            mask["human_parts"] = torch.tensor(has_person)
        if "sal" in self.tasks:
            sal = load_png(paths["sal"]).astype(np.float32) / 255.0
            y["sal"] = torch.from_numpy((sal > 0.5).astype(np.float32))[None]
        if "normals" in self.tasks:
            assert labelmap is not None
            n = 2.0 * load_png(paths["normals"]).astype(np.float32)[..., :3] / 255.0 - 1.0
            valid = labelmap > 0
            if self.normals_classes is not None:
                valid = np.isin(labelmap, self.normals_classes)
            n = np.where(valid[..., None], n, 0.0).astype(np.float32)
            y["normals"] = torch.from_numpy(np.ascontiguousarray(n)).permute(2, 0, 1)
        if "edge" in self.tasks:
            assert labelmap is not None
            y["edge"] = torch.from_numpy(label_boundaries(labelmap).astype(np.float32))[None]
        for t, v in y.items():
            if tuple(v.shape[-2:]) != shape:
                raise ValueError(
                    f"pascal_context: the {t} map of {i} is {tuple(v.shape[-2:])}, the image "
                    f"{shape}"
                )
        image = resize_map(image, self.size, "bilinear")
        y = {t: resize_map(v, self.size, "nearest") for t, v in y.items()}
        for t in ("semseg", "human_parts"):
            if t in y:
                y[t] = y[t][0]  # (H, W) class labels
        return image, y, mask


def _normals_classes(root: Path) -> list[int] | None:
    """The survey's normals classes, if ``json/nyu_classes.json`` and
    ``json/context_classes.json`` are in the root: the PASCAL-Context ids of the NYU class
    names, without ``unknown``, plus ``tvmonitor``."""
    nyu_file, ctx_file = root / "json" / "nyu_classes.json", root / "json" / "context_classes.json"
    if not (nyu_file.is_file() and ctx_file.is_file()):
        return None
    nyu, ctx = json.loads(nyu_file.read_text()), json.loads(ctx_file.read_text())
    classes = [int(ctx[c]) for c in nyu if c in ctx and c != "unknown"]
    if "tvmonitor" in ctx:
        classes.append(int(ctx["tvmonitor"]))
    return classes


def pascal_tasks(tasks: Sequence[str], normals_loss: str = "l1") -> tuple[Task, ...]:
    """The survey's PASCAL-Context tasks, in the order asked.

    .. note:: ``normals`` trains with ``normals_loss``: ``l1`` (default), the survey's L1 on
       the normalised prediction (:class:`~mtlkit.tasks.NormalL1Loss`), or ``cosine``
       (``1 - cos``). Edges use :class:`~mtlkit.data._dense_tasks.BalancedBCELoss`
       (positive weight 0.95, as the survey's code), saliency the same loss with weights from
       each batch's label frequencies (``pos_weight=None``, the survey's and HED's).
    """
    if normals_loss not in NORMAL_LOSSES:
        raise ValueError(f"normals_loss must be one of {sorted(NORMAL_LOSSES)}, got "
                         f"{normals_loss!r}")
    table = {
        "semseg": lambda: Task.segmentation("semseg", 21, ignore_index=IGNORE),
        "human_parts": lambda: Task.segmentation("human_parts", 7, ignore_index=IGNORE),
        "sal": lambda: saliency_task("sal"),
        "normals": lambda: Task.normals("normals", loss=normals_loss),
        "edge": lambda: edge_task("edge"),
    }
    return tuple(table[t]() for t in tasks)


def check_task_list(tasks: Sequence[str], known: Sequence[str], name: str) -> tuple[str, ...]:
    chosen = tuple(tasks)
    unknown = [t for t in chosen if t not in known]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise ValueError(f"{name}: tasks must be distinct names among {list(known)}, got "
                         f"{list(chosen)}")
    return chosen


def check_size(size: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    s = tuple(size)
    if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s):
        raise ValueError(f"{name}: size must be (H, W) positive ints or None, got {size!r}")
    return (int(s[0]), int(s[1]))


def split_train_val(ids: Sequence[str], seed: int, val_fraction: float,
                    name: str) -> tuple[list[str], list[str]]:
    """A seeded ``val_fraction`` of ``ids`` held out for model selection."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0 < val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(ids) < 2:
        raise ValueError(f"{name}: the train split has {len(ids)} image; need 2 to hold one out")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
    held = set(order[:n_val])
    return ([i for k, i in enumerate(ids) if k not in held],
            [i for k, i in enumerate(ids) if k in held])


@register("pascal_context")
def pascal_context(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    tasks: Sequence[str] = PASCAL_TASKS,
    size: Sequence[int] | None = (512, 512),
    val_fraction: float = 0.1,
    normals_loss: str = "l1",
) -> DatasetBundle:
    """PASCAL-Context with the survey's five tasks: ``semseg`` (21 classes), ``human_parts``
    (7), ``sal``, ``normals``, ``edge`` (see :class:`PascalContextSplit` for the files).

    ``ImageSets/Context/train.txt`` (4,998 images in the survey's setup) is split into
    ``train`` and a seeded ``val_fraction`` for model selection; ``ImageSets/Context/val.txt``
    (5,105 images), the split the survey reports on, becomes ``test``. Every item is resized
    to ``size`` (512 x 512 as in the survey); no augmentation. The bundle's default model is
    ``mti_net`` (HRNet-W18), the survey's best model on this dataset.

    Args:
        root: the ``PASCAL_MT`` folder.
        seed: seeds the validation hold-out.
        tasks: a subset of the five tasks, in output order.
        size: ``(H, W)`` of every item (None: keep each image's size, batch size 1).
        val_fraction: fraction of the training images held out, in (0, 1).
        normals_loss: ``l1`` (the survey's) or ``cosine`` (``1 - cos``).

    Raises:
        ValueError: no root, an unknown task, a bad size, fraction or ``normals_loss``.
        FileNotFoundError: a split file or an image's file is missing (the message names it).
    """
    path = require_root("pascal_context", root)
    chosen = check_task_list(tasks, PASCAL_TASKS, "pascal_context")
    task_list = pascal_tasks(chosen, normals_loss)
    shape = check_size(size, "pascal_context")
    train_ids = read_ids(path / "ImageSets" / "Context" / "train.txt", "pascal_context")
    test_ids = read_ids(path / "ImageSets" / "Context" / "val.txt", "pascal_context")
    train_ids, val_ids = split_train_val(train_ids, seed, val_fraction, "pascal_context")
    classes = _normals_classes(path)

    def split(ids: list[str]) -> PascalContextSplit:
        return PascalContextSplit(path, ids, chosen, shape, classes)

    h, w = shape if shape is not None else split(train_ids[:1])[0][0].shape[-2:]
    info = {
        "root": str(path),
        "seed": seed,
        "val_ids": val_ids,
        "normals_classes": "json/*.json" if classes is not None else "every labelled pixel",
        "layout": "PASCAL_MT of the dense-prediction survey (arXiv:2004.13379); "
                  "test = ImageSets/Context/val.txt",
    }
    return DatasetBundle(
        "pascal_context", split(train_ids), split(val_ids), split(test_ids),
        task_list, (3, int(h), int(w)), info, model="mti_net",
    )
