"""Tiny files in exactly the formats the benchmark loaders read (written by the tests)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtlkit.data._census import COLUMNS


def write_cityscapes(root: Path, n_train: int = 4, n_val: int = 2, h: int = 32, w: int = 32,
                     classes: int = 7) -> dict[str, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    written: dict[str, list[dict[str, np.ndarray]]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in ("image", f"label_{classes}", "depth"):
            (root / split / kind).mkdir(parents=True)
        written[split] = []
        for i in range(n):
            arrays = {
                "image": rng.random((h, w, 3)).astype(np.float32),
                f"label_{classes}": rng.integers(-1, classes, (h, w)).astype(np.float32),
                "depth": (rng.random((h, w, 1)) * (rng.random((h, w, 1)) > 0.2)).astype(
                    np.float32),
            }
            for kind, a in arrays.items():
                np.save(root / split / kind / f"{i}.npy", a)
            written[split].append(arrays)
    return written


OFFICE31 = ("amazon", "dslr", "webcam")


def write_office(root: Path, domains=OFFICE31, classes: int = 31,
                 sizes=((3, 2, 2), (2, 1, 1), (4, 2, 1))) -> dict[str, dict[str, list]]:
    """Per domain, ``sizes[d] = (train, val, test)`` 8x8 images listed LibMTL's way."""
    rng = np.random.default_rng(1)
    lists: dict[str, dict[str, list]] = {}
    for d, counts in zip(domains, sizes):
        lists[d] = {}
        for split, n in zip(("train", "val", "test"), counts):
            lines, items = [], []
            for k in range(n):
                label = int(rng.integers(0, classes))
                rel = f"{d}/images/c{label}/frame_{split}_{k}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(root / rel.replace(".jpg", ".png"), format="PNG")
                (root / rel.replace(".jpg", ".png")).rename(root / rel)
                lines.append(f"{rel} {label}")
                items.append((rel, label, pixels))
            (root / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
            lists[d][split] = items
    return lists


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i",
                                                                      *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 10, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        _idx(root / f"{prefix}-images-idx3-ubyte", images)
        _idx(root / f"{prefix}-labels-idx1-ubyte", labels)
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
    return out


def census_row(rng: np.random.Generator, *, worker: str | None = None) -> list[str]:
    """One row of census-income.data: 42 cells, ', '-separated as UCI writes them."""
    cells = []
    for c in COLUMNS:
        if c in ("age", "wage_per_hour", "capital_gains", "capital_losses",
                 "dividends_from_stocks", "num_persons_worked_for_employer",
                 "weeks_worked_in_year"):
            cells.append(str(int(rng.integers(0, 90))))
        elif c == "instance_weight":
            cells.append(f"{rng.random() * 3000:.2f}")
        elif c == "education":
            cells.append(str(rng.choice(["Bachelors degree(BA AB BS)", "High school graduate",
                                         "Children", "Doctorate degree(PhD EdD)"])))
        elif c == "marital_status":
            cells.append(str(rng.choice(["Never married", "Married-civilian spouse present",
                                         "Divorced"])))
        elif c == "income":
            cells.append(str(rng.choice(["- 50000.", "50000+."])))
        elif c == "class_of_worker":
            cells.append(worker or str(rng.choice(["Private", "Not in universe"])))
        else:
            cells.append(str(rng.choice(["A", "B", "?"])))
    return cells


def write_census(root: Path, n_train: int = 12, n_test: int = 8) -> None:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    train = [census_row(rng) for _ in range(n_train)]
    test = [census_row(rng, worker="Federal government" if i == 0 else None)
            for i in range(n_test)]  # one worker class never seen in training
    for name, rows in (("census-income.data", train), ("census-income.test", test)):
        (root / name).write_text("".join(", ".join(r) + "\n" for r in rows))


def write_click_log(path: Path, n: int = 40, seed: int = 4) -> None:
    """A click + conversion log: conversion empty on every unclicked row."""
    rng = np.random.default_rng(seed)
    lines = ["user,item,price,click,conversion,rating"]
    for i in range(n):
        click = int(rng.random() < 0.5)
        conv = str(int(rng.random() < 0.4)) if click else ""
        rating = "" if i % 3 == 0 else f"{rng.normal():.3f}"
        lines.append(f"u{rng.integers(0, 5)},i{rng.integers(0, 4)},{rng.random() * 100:.2f},"
                     f"{click},{conv},{rating}")
    path.write_text("\n".join(lines) + "\n")


def write_qm9(root: Path, n: int = 12) -> list:
    """PyTorch Geometric's processed QM9 (``processed/data_v3.pt``) with ``n`` small molecules."""
    from torch_geometric.data import Data
    from torch_geometric.datasets import QM9

    g = torch.Generator().manual_seed(5)
    molecules = []
    for i in range(n):
        atoms = 2 + i % 4
        x = torch.zeros(atoms, 11)
        x[torch.arange(atoms), torch.randint(0, 5, (atoms,), generator=g)] = 1.0
        x[:, 5] = torch.randint(1, 10, (atoms,), generator=g).float()
        src = torch.arange(atoms - 1)
        edge_index = torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
        bond = torch.randint(0, 4, (atoms - 1,), generator=g).repeat(2)
        edge_attr = torch.nn.functional.one_hot(bond, 4).float()
        molecules.append(Data(x=x, edge_index=edge_index, edge_attr=edge_attr,
                              pos=torch.randn(atoms, 3, generator=g),
                              z=x[:, 5].long(), y=torch.randn(1, 19, generator=g) * 3 + i,
                              idx=torch.tensor([i]), name=f"gdb_{i}"))
    (root / "processed").mkdir(parents=True)
    (root / "raw").mkdir()
    QM9.save(molecules, str(root / "processed" / "data_v3.pt"))
    return molecules
