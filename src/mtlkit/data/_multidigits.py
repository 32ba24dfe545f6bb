"""MultiDigits: two real 8x8 digit scans overlaid on one canvas (a small MultiMNIST)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mtlkit.data._bundle import DatasetBundle, MultiTaskTensorDataset
from mtlkit.data._registry import register
from mtlkit.tasks import Task

SPLITS = ("train", "val", "test")
DIGIT = 8  # side of a scan


def _fractions(split: Sequence[float]) -> tuple[float, float, float]:
    if (
        not isinstance(split, (list, tuple))
        or len(split) != 3
        or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0 for f in split)
        or abs(sum(split) - 1.0) > 1e-9
    ):
        raise ValueError(f"split must be three positive fractions summing to 1, got {split!r}")
    return float(split[0]), float(split[1]), float(split[2])


def _counts(total: int, fractions: tuple[float, float, float]) -> list[int]:
    val = round(total * fractions[1])
    test = round(total * fractions[2])
    return [total - val - test, val, test]


def _sample_pairs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` ordered pairs (i, j), i != j, of ``range(n)``; distinct while there are enough."""
    if n < 2:
        raise ValueError(f"a split holds {n} scan(s); it needs at least 2 to form pairs")
    space = n * (n - 1)
    codes = rng.choice(space, size=k, replace=k > space)
    i = codes // (n - 1)
    j = codes % (n - 1)
    j = j + (j >= i)  # skip the diagonal
    return np.stack([i, j], axis=1)


def _overlay(
    scans: np.ndarray, pairs: np.ndarray, canvas: int, jitter: int, rng: np.random.Generator
) -> np.ndarray:
    """Canvases ``(k, canvas, canvas)``: left scan near the top-left corner, right scan near
    the bottom-right corner (each moved by up to ``jitter`` pixels inwards), combined by max."""
    k = len(pairs)
    out = np.zeros((k, canvas, canvas), dtype=np.float32)
    shifts = rng.integers(0, jitter + 1, size=(k, 4))
    far = canvas - DIGIT
    for s in np.unique(shifts, axis=0):
        rows = np.flatnonzero((shifts == s).all(axis=1))
        ly, lx, ry, rx = int(s[0]), int(s[1]), far - int(s[2]), far - int(s[3])
        left = np.zeros((len(rows), canvas, canvas), dtype=np.float32)
        right = np.zeros_like(left)
        left[:, ly : ly + DIGIT, lx : lx + DIGIT] = scans[pairs[rows, 0]]
        right[:, ry : ry + DIGIT, rx : rx + DIGIT] = scans[pairs[rows, 1]]
        out[rows] = np.maximum(left, right)
    return out


@register("multidigits")
def multidigits(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    size: int = 5_000,
    canvas: int = 12,
    jitter: int = 1,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    missing: float = 0.0,
) -> DatasetBundle:
    """The built-in default dataset: pairs of real handwritten digit scans on one canvas.

    Source images: the 1,797 8x8 scans of ``sklearn.datasets.load_digits()`` (UCI optical
    recognition of handwritten digits; intensities 0..16, scaled to [0, 1]). As in MultiMNIST
    (Sabour et al. 2017; used for MTL by Sener and Koltun, NeurIPS 2018, arXiv:1810.04650),
    each sample overlays two scans, one near the top-left and one near the bottom-right corner of
    a ``canvas x canvas`` image (each moved inwards by 0..``jitter`` pixels at random), combined
    with a pixel-wise max so they overlap in the middle.

    Tasks: ``left`` and ``right`` (10-class digit of each scan, cross-entropy) and ``sum``
    (regression of left + right on the raw scale 0..18, MSE), so the losses differ in scale as
    in real multi-task problems.

    Splits: the scans are first split ``split`` (70/15/15) by the seed, then each split's pairs
    are drawn from its own scans only, so no scan appears in two splits; pairs are ordered,
    of two different scans, and distinct while the split has enough scans.
    ``info["scans"][split]`` holds each sample's two scan indices into ``load_digits()``.

    Everything random comes from ``numpy.random.default_rng(seed)``, so a seed gives the same
    data for a given NumPy version.

    Args:
        root: must be None (the data ship with scikit-learn).
        seed: seeds the scan split, the pairs and the jitter.
        size: total number of pairs, divided among the splits by ``split`` (default 3,500 /
            750 / 750).
        canvas: side of the square canvas (> 8 + 2 * jitter).
        jitter: largest random inward shift of each scan.
        split: train/val/test fractions (of the scans and of the pairs).
        missing: probability that a training label is hidden, independently per sample and
            task; then training items carry masks ``(x, y, mask)``. Validation and test stay
            fully labelled.

    Example:
        >>> from mtlkit.data import multidigits
        >>> b = multidigits(size=100, seed=1)
        >>> x, y = b.train[0]
        >>> tuple(x.shape), sorted(y), len(b.train), len(b.val), len(b.test)
        ((1, 12, 12), ['left', 'right', 'sum'], 70, 15, 15)
        >>> float(y["sum"]) == int(y["left"]) + int(y["right"])
        True
    """
    from sklearn.datasets import load_digits

    if root is not None:
        raise ValueError(f"multidigits is built in and takes no root (got root={root!r})")
    for arg, value, low in (
        ("size", size, 3),
        ("canvas", canvas, DIGIT + 1),
        ("jitter", jitter, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
    if canvas - DIGIT - jitter <= jitter:
        raise ValueError(
            f"canvas={canvas} is too small for jitter={jitter}: need canvas > {DIGIT} + 2 * jitter "
            "so that the second digit is always below and right of the first"
        )
    if isinstance(missing, bool) or not isinstance(missing, (int, float)) or not 0 <= missing < 1:
        raise ValueError(f"missing must be a probability in [0, 1), got {missing!r}")
    fractions = _fractions(split)

    digits = load_digits()
    scans = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scans))
    scan_counts = _counts(len(scans), fractions)
    pair_counts = _counts(size, fractions)
    if min(pair_counts) < 1:
        raise ValueError(f"size={size} leaves a split without samples; use a larger size")

    datasets = {}
    scans_info = {}
    scan_split = {}
    start = 0
    for name, n_scans, n_pairs in zip(SPLITS, scan_counts, pair_counts):
        ids = order[start : start + n_scans]
        start += n_scans
        local = _sample_pairs(rng, n_scans, n_pairs)
        pairs = ids[local]  # global scan indices, (k, 2)
        images = _overlay(scans, pairs, canvas, jitter, rng)
        left, right = labels[pairs[:, 0]], labels[pairs[:, 1]]
        targets = {
            "left": torch.from_numpy(left),
            "right": torch.from_numpy(right),
            "sum": torch.from_numpy((left + right).astype(np.float32)),
        }
        masks = None
        if name == "train" and missing > 0:
            keep = rng.random((n_pairs, 3)) >= missing
            masks = {t: torch.from_numpy(keep[:, c].copy()) for c, t in enumerate(targets)}
        datasets[name] = MultiTaskTensorDataset(torch.from_numpy(images)[:, None], targets, masks)
        scans_info[name] = torch.from_numpy(pairs)
        scan_split[name] = torch.from_numpy(np.sort(ids))

    tasks = (
        Task.classification("left", 10),
        Task.classification("right", 10),
        Task.regression("sum"),
    )
    info = {
        "source": "sklearn.datasets.load_digits (1,797 8x8 scans)",
        "seed": seed,
        "canvas": canvas,
        "jitter": jitter,
        "missing": missing,
        "scans": scans_info,
        "scan_split": scan_split,
    }
    return DatasetBundle(
        "multidigits",
        datasets["train"],
        datasets["val"],
        datasets["test"],
        tasks,
        (1, canvas, canvas),
        info,
    )
