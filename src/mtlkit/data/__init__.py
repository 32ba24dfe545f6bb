"""Multi-task datasets and the registry that loads them by name.

``load(name, root=None, seed=0, **options)`` returns a :class:`DatasetBundle` (train, val and
test datasets, the tasks, the input shape); ``available()`` lists the names:

- ``multidigits`` (built in, the default): two real 8x8 digit scans on one canvas; tasks
  ``left``, ``right`` (10 classes) and ``sum`` (regression, 0..18).
- ``gradnorm_toy`` (generated): the GradNorm synthetic regression, T tasks of very different
  output scales.
- ``nyuv2`` (from disk, MTAN layout): segmentation, depth, surface normals.
- ``celeba`` (from disk, official files): 40 binary face attributes.
- ``cityscapes`` (from disk, MTAN layout): 7-class (or 19) segmentation and depth.
- ``office31``, ``office_home`` (from disk, LibMTL lists): one classification task per domain,
  multi-input (each task has its own images: :class:`MultiInputDataset`).
- ``qm9`` (PyTorch Geometric root; optional extra): 11 normalised regression targets.
- ``multimnist`` (built from the MNIST idx files): left and right digit.
- ``census`` (UCI census-income files): the MMoE paper's binary task pairs.
- ``tabular`` (any CSV / Parquet file): named features, one task per label column.
- ``nyud`` (from disk, the dense-prediction survey's layout): 40-class segmentation, depth,
  normals, edges.
- ``pascal_context`` (from disk, the survey's layout): segmentation, human parts, saliency,
  normals, edges.

Items are ``(x, {task: target})``, or ``(x, {task: target}, {task: mask})`` when labels are
missing; the default ``DataLoader`` collation batches both.
"""

from mtlkit.data._bundle import DatasetBundle, MultiTaskTensorDataset
from mtlkit.data._celeba import CelebASplit, celeba
from mtlkit.data._census import census
from mtlkit.data._cityscapes import CityscapesSplit, cityscapes
from mtlkit.data._gradnorm import gradnorm_toy
from mtlkit.data._multi_input import MultiInputDataset
from mtlkit.data._multidigits import multidigits
from mtlkit.data._multimnist import multimnist
from mtlkit.data._nyud import NYUDSplit, nyud
from mtlkit.data._nyuv2 import NYUv2Split, nyuv2
from mtlkit.data._office import ImageListDataset, office31, office_home
from mtlkit.data._pascal import PascalContextSplit, pascal_context
from mtlkit.data._qm9 import qm9
from mtlkit.data._registry import available, load, options, register
from mtlkit.data._tabular import TabularEncoder, TabularTask, read_table, tabular

__all__ = [
    "CelebASplit",
    "CityscapesSplit",
    "DatasetBundle",
    "ImageListDataset",
    "MultiInputDataset",
    "MultiTaskTensorDataset",
    "NYUDSplit",
    "NYUv2Split",
    "PascalContextSplit",
    "TabularEncoder",
    "TabularTask",
    "available",
    "celeba",
    "census",
    "cityscapes",
    "gradnorm_toy",
    "load",
    "multidigits",
    "multimnist",
    "nyud",
    "nyuv2",
    "office31",
    "office_home",
    "options",
    "pascal_context",
    "qm9",
    "read_table",
    "register",
    "tabular",
]
