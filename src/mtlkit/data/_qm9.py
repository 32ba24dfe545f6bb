"""QM9 (11 normalised regression targets) from a PyTorch Geometric root, as Nash-MTL / FAMO."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.metrics import MAE
from mtlkit.nn._mpnn import ATOM_COLUMNS, NODE_FEATURES, POSITION, PRESENT
from mtlkit.tasks import MetricSet, RegressionLoss, Task

#: PyG QM9 target columns of the benchmark (gap, 4, is left out; atomization energies 12-15)
TARGETS = (0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)
NAMES = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
#: targets reported in meV instead of PyG's eV (as the Nash-MTL code)
MEV = ("homo", "lumo", "zpve", "U0", "U", "H", "G")
MAX_ATOMS = 29
PROCESSED = "processed/data_v3.pt"


class ScaledMAE(MAE):
    """MAE of ``scale * pred`` against ``scale * target``: a normalised target's error in its
    physical unit (``scale`` = the target's standard deviation times a unit factor)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def _error(self, diff: Tensor) -> Tensor:
        return diff.abs() * self.scale


def _pyg_qm9(path: Path):
    try:
        from torch_geometric.datasets import QM9
    except ImportError:
        raise ImportError(
            "qm9 needs PyTorch Geometric, an optional extra: pip install 'mtlkit[qm9]' "
            "(or pip install torch_geometric)"
        ) from None

    class LocalQM9(QM9):
        """PyG's QM9 that never downloads: the processed file must be there."""

        def download(self) -> None:
            if not (Path(self.root) / PROCESSED).is_file():
                raise FileNotFoundError(
                    f"qm9: missing file {Path(self.root) / PROCESSED} (PyTorch Geometric's "
                    "processed QM9; run torch_geometric.datasets.QM9(root) once where it can "
                    "download)"
                )

    if not (path / PROCESSED).is_file():
        raise FileNotFoundError(f"qm9: missing file {path / PROCESSED} (PyTorch Geometric's "
                                "processed QM9)")
    try:
        return LocalQM9(str(path))
    except (RuntimeError, KeyError, TypeError, EOFError) as err:
        raise ValueError(f"qm9: {path / PROCESSED} is not PyTorch Geometric's processed QM9 "
                         f"({err.__class__.__name__}: {err})") from None


class QM9Molecules(Dataset):
    """Packed molecules (see :class:`mtlkit.nn.MPNN`) with their normalised targets.

    An item is ``(x (29, 15 + 29) float32, {target name: () float32})``.
    """

    def __init__(self, store: dict[str, Tensor], indices: Tensor, y: Tensor) -> None:
        self.store, self.indices, self.y = store, indices, y

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        m = int(self.indices[i])
        s = self.store
        a0, a1 = int(s["node_slice"][m]), int(s["node_slice"][m + 1])
        e0, e1 = int(s["edge_slice"][m]), int(s["edge_slice"][m + 1])
        k = a1 - a0
        x = torch.zeros(MAX_ATOMS, ATOM_COLUMNS + MAX_ATOMS)
        x[:k, NODE_FEATURES] = s["x"][a0:a1]
        x[:k, POSITION] = s["pos"][a0:a1]
        x[:k, PRESENT] = 1.0
        src, dst = s["edge_index"][:, e0:e1]
        x[src, ATOM_COLUMNS + dst] = s["bond"][e0:e1].float()
        return x, {n: self.y[i, j] for j, n in enumerate(NAMES)}


@register("qm9")
def qm9(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    val_size: int = 10_000,
    test_size: int = 10_000,
) -> DatasetBundle:
    """QM9 with the 11 targets of the Nash-MTL / FAMO experiments, normalised on train.

    Reads PyTorch Geometric's QM9 root (``{root}/processed/data_v3.pt``, written by
    ``torch_geometric.datasets.QM9(root)``; 130,831 molecules); PyTorch Geometric is an
    optional extra (``pip install 'mtlkit[qm9]'``) and is used only to read the file. As the
    Nash-MTL code (``experiments/quantum_chemistry``): targets ``mu, alpha, homo, lumo, r2,
    zpve, U0, U, H, G, Cv`` (PyG columns 0, 1, 2, 3, 5, 6, 12-15, 11: atomization energies for
    U0, U, H, G); a random permutation (seeded by ``seed``) gives the first 10,000 molecules to
    test, the next 10,000 to validation and the rest (110,831) to training; each target is
    standardised with the training mean and standard deviation. Tasks train on MSE of the
    normalised targets; their ``mae`` is in the physical unit (eV -> meV for homo, lumo, zpve
    and the energies), the numbers papers report. Every pair of atoms is an edge (their
    ``Complete`` transform), with the distance as an attribute (:class:`mtlkit.nn.MPNN`).

    Args:
        root: the PyG QM9 root.
        seed: seeds the split.
        val_size, test_size: molecules in validation and test.

    Raises:
        ImportError: torch_geometric is not installed (the message says how to install it).
        FileNotFoundError: the processed file is missing.
        ValueError: a file that is not PyG's processed QM9, or splits larger than the data.
    """
    path = require_root("qm9", root)
    for field, v in (("val_size", val_size), ("test_size", test_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{field} must be a positive integer, got {v!r}")
    dataset = _pyg_qm9(path)
    data, slices = dataset._data, dataset.slices
    n = len(dataset)
    if data.x is None or data.x.shape[1] != 11 or data.y is None or data.y.shape[1] < 16:
        raise ValueError(f"qm9: {path / PROCESSED} does not hold QM9's 11 atom features and 19 "
                         "targets")
    if n < val_size + test_size + 2:
        raise ValueError(f"qm9: {n} molecules cannot give {test_size} test and {val_size} "
                         "validation molecules and a training set")
    node_slice = slices["x"]
    if int((node_slice[1:] - node_slice[:-1]).max()) > MAX_ATOMS:
        raise ValueError(f"qm9: {path / PROCESSED} has a molecule of more than {MAX_ATOMS} atoms")
    store = {
        "x": data.x.float(), "pos": data.pos.float(), "node_slice": node_slice,
        "edge_index": data.edge_index, "edge_slice": slices["edge_index"],
        "bond": data.edge_attr.argmax(1) + 1,  # one-hot single/double/triple/aromatic -> 1..4
    }
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx, val_idx = order[:test_size], order[test_size:test_size + val_size]
    train_idx = order[test_size + val_size:]
    y = data.y[:, list(TARGETS)].double()
    mean, std = y[train_idx].mean(0), y[train_idx].std(0)
    y = ((y - mean) / std).float()
    tasks = tuple(
        Task(name, RegressionLoss("mse"),
             MetricSet.of(("mae", ScaledMAE,
                           {"scale": float(std[j]) * (1000.0 if name in MEV else 1.0)})),
             "mae", "regression", 1)
        for j, name in enumerate(NAMES)
    )
    splits = [QM9Molecules(store, idx, y[idx]) for idx in (train_idx, val_idx, test_idx)]
    info = {"root": str(path), "seed": seed, "targets": dict(zip(NAMES, TARGETS)),
            "mean": mean.tolist(), "std": std.tolist(), "units_meV": list(MEV),
            "source": "Nash-MTL (Navon et al., ICML 2022, arXiv:2202.01017), QM9 protocol"}
    return DatasetBundle("qm9", *splits, tasks, (MAX_ATOMS, ATOM_COLUMNS + MAX_ATOMS), info,
                         model="mpnn")


def nash_mtl_single_task_mae() -> dict[str, float]:
    """The single-task MAEs the Nash-MTL code takes as Δm baselines (its ``BASE``)."""
    values: Sequence[float] = (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244,
                               63.852, 66.223, 0.07212)
    return dict(zip(NAMES, values))
