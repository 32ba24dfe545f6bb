"""Multi-task datasets and the registry that loads them by name.

``load(name, root=None, seed=0, **options)`` returns a :class:`DatasetBundle` (train, val and
test datasets, the tasks, the input shape); ``available()`` lists the names:

- ``multidigits`` (built in, the default): two real 8x8 digit scans on one canvas; tasks
  ``left``, ``right`` (10 classes) and ``sum`` (regression, 0..18).
- ``gradnorm_toy`` (generated): the GradNorm synthetic regression, T tasks of very different
  output scales.
- ``nyuv2`` (from disk, MTAN layout): segmentation, depth, surface normals.
- ``celeba`` (from disk, official files): 40 binary face attributes.
- ``nyud`` (from disk, the dense-prediction survey's layout): 40-class segmentation, depth,
  normals, edges.
- ``pascal_context`` (from disk, the survey's layout): segmentation, human parts, saliency,
  normals, edges.

Items are ``(x, {task: target})``, or ``(x, {task: target}, {task: mask})`` when labels are
missing; the default ``DataLoader`` collation batches both.
"""

from mtlkit.data._bundle import DatasetBundle, MultiTaskTensorDataset
from mtlkit.data._celeba import CelebASplit, celeba
from mtlkit.data._gradnorm import gradnorm_toy
from mtlkit.data._multidigits import multidigits
from mtlkit.data._nyud import NYUDSplit, nyud
from mtlkit.data._nyuv2 import NYUv2Split, nyuv2
from mtlkit.data._pascal import PascalContextSplit, pascal_context
from mtlkit.data._registry import available, load, options, register

__all__ = [
    "CelebASplit",
    "DatasetBundle",
    "MultiTaskTensorDataset",
    "NYUDSplit",
    "NYUv2Split",
    "PascalContextSplit",
    "available",
    "celeba",
    "gradnorm_toy",
    "load",
    "multidigits",
    "nyud",
    "nyuv2",
    "options",
    "pascal_context",
    "register",
]
