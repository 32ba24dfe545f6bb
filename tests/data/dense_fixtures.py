"""Tiny PASCAL-Context (``PASCAL_MT``) and NYUD-v2 (``NYUD_MT``) folders in the real file
formats: JPEG images, PNG labels, MATLAB ``.mat`` structs, ``.npy`` maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import io as sio

H, W = 12, 16


def _struct_array(fields: list[str], rows: list[dict]) -> np.ndarray:
    """A MATLAB 1xN struct array as ``scipy.io.savemat`` writes it."""
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, row in enumerate(rows):
        for f in fields:
            arr[0, j][f] = row[f]
    return arr


def _parts_mat(path: Path, persons: list[dict[str, np.ndarray]], other: bool = True) -> None:
    """PASCAL-Part ``anno`` with the given persons (part name -> mask) and a dog without
    parts (class 12)."""
    objects = []
    if other:
        objects.append({"class": "dog", "class_ind": np.array([[12]], dtype=np.uint8),
                        "mask": np.ones((H, W), np.uint8), "parts": np.zeros((0, 0))})
    for parts in persons:
        part_rows = [{"part_name": np.array([name]), "mask": m.astype(np.uint8)}
                     for name, m in parts.items()]
        objects.append({
            "class": "person", "class_ind": np.array([[15]], dtype=np.uint8),
            "mask": np.ones((H, W), np.uint8),
            "parts": _struct_array(["part_name", "mask"], part_rows),
        })
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0]["imname"] = path.stem
    anno[0, 0]["objects"] = _struct_array(["class", "class_ind", "mask", "parts"], objects)
    sio.savemat(path, {"anno": anno})


def write_pascal(root: Path, train: int = 3, val: int = 2, seed: int = 0) -> dict[str, dict]:
    """Write a PASCAL_MT folder; returns the labels written, by image id."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "semseg/pascal-context", "semseg/VOC12", "human_parts", "sal_distill",
              "normals_distill", "pascal-context/trainval", "ImageSets/Context", "json"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i:06d}" for i in range(train + val)]
    (root / "ImageSets/Context/train.txt").write_text("\n".join(ids[:train]) + "\n")
    (root / "ImageSets/Context/val.txt").write_text("\n".join(ids[train:]) + "\n")
    # the survey's normals classes: NYU class names that PASCAL-Context also has, + tvmonitor
    (root / "json/nyu_classes.json").write_text('["wall", "floor", "unknown"]')
    (root / "json/context_classes.json").write_text(
        '{"wall": 3, "floor": 5, "unknown": 0, "tvmonitor": 7, "sky": 9}'
    )
    written = {}
    for k, i in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{i}.jpg"
        )
        semseg = rng.integers(0, 21, (H, W)).astype(np.uint8)
        semseg[0, 0] = 255
        folder = "VOC12" if k == 0 else "pascal-context"
        Image.fromarray(semseg).save(root / "semseg" / folder / f"{i}.png")
        labelmap = np.zeros((H, W), np.uint16)  # context classes 3 | 9 | 7 in vertical bands
        labelmap[:, 5:] = 9
        labelmap[:, 10:] = 7
        sio.savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": labelmap})
        sal = np.zeros((H, W), np.uint8)
        sal[:, :4] = 200  # > 127.5: salient
        sal[:, 4:8] = 120  # below half: not salient
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
        normals = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(normals).save(root / "normals_distill" / f"{i}.png")
        persons = []
        if k % 2 == 0:  # even images have a person with a head and a left foot
            head = np.zeros((H, W), bool)
            head[:2, :2] = True
            foot = np.zeros((H, W), bool)
            foot[-1, -3:] = True
            persons = [{"head": head, "lfoot": foot}]
        _parts_mat(root / "human_parts" / f"{i}.mat", persons)
        written[i] = {"semseg": semseg, "labelmap": labelmap, "normals": normals,
                      "has_person": bool(persons)}
    return written


def write_nyud(root: Path, train: int = 3, val: int = 2, seed: int = 0) -> dict[str, dict]:
    """Write a NYUD_MT folder; returns the labels written, by image id."""
    rng = np.random.default_rng(seed)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:04d}" for i in range(train + val)]
    (root / "gt_sets/train.txt").write_text("\n".join(ids[:train]) + "\n")
    (root / "gt_sets/val.txt").write_text("\n".join(ids[train:]) + "\n")
    written = {}
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.jpg"
        )
        seg = rng.integers(0, 41, (H, W)).astype(np.uint8)  # 0 = unlabelled, 1..40
        Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        depth = rng.uniform(0.5, 5.0, (H, W)).astype(np.float32)
        depth[0, :3] = 0
        np.save(root / "depth" / f"{i}.npy", depth)
        n = rng.normal(size=(H, W, 3)).astype(np.float32)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        np.save(root / "normals" / f"{i}.npy", n)
        edge = (rng.uniform(size=(H, W)) > 0.8).astype(np.float32)
        np.save(root / "edge" / f"{i}.npy", edge)
        written[i] = {"semseg": seg, "depth": depth, "normals": n, "edge": edge}
    return written
