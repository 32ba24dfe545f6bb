"""Run logs: JSON lines always, CSV copies for spreadsheets, TensorBoard when installed.

``steps.jsonl`` has one record per logged step (losses, effective task weights, and where
available the pairwise cosine similarity of task gradients); ``epochs.jsonl`` one record per
epoch (validation and test metrics). The CSV files flatten the same records
(``weight/seg``, ``val/seg/miou``, ...).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STEPS, EPOCHS = "steps.jsonl", "epochs.jsonl"


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"val": {"a/acc": 1}}`` -> ``{"val/a/acc": 1}``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def read_jsonl(path: Path, *, drop_partial_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (none if the file is absent).

    A line that is not a JSON object (a log cut short by a full disk, or edited by hand) is a
    ``ValueError`` naming the file and the line. With ``drop_partial_tail`` an unfinished last
    line (no newline: the process was killed while writing it) is dropped instead, which is
    what resuming from a checkpoint wants: that record came after the checkpoint anyway.
    """
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if drop_partial_tail and not text.endswith("\n"):
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: truncated or invalid log record "  # noqa: TRY004
                             f"({line[:40]!r}); delete the line or the run folder")
        records.append(record)
    return records


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    rows = [flatten(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


class RunLog:
    """Appends step and epoch records under ``out_dir`` (does nothing when it is None)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self._tb = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            try:  # optional: TensorBoard only when the package is installed
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self._tb = None

    def step(self, record: dict[str, Any]) -> None:
        self._append(STEPS, record, record["step"])

    def epoch(self, record: dict[str, Any]) -> None:
        self._append(EPOCHS, record, record["epoch"])
        if self.out_dir is not None:
            for name in (STEPS, EPOCHS):
                write_csv(read_jsonl(self.out_dir / name), self.out_dir / name.replace(".jsonl", ".csv"))

    def truncate(self, step: int, epoch: int) -> None:
        """Drop records written after the checkpoint we resume from."""
        if self.out_dir is None:
            return
        for name, key, last in ((STEPS, "step", step), (EPOCHS, "epoch", epoch)):
            fresh = step == 0 and epoch == 0  # a fresh run: nothing of the old log stays
            records = [] if fresh else read_jsonl(self.out_dir / name, drop_partial_tail=True)
            kept = [r for r in records if r[key] <= last]
            with (self.out_dir / name).open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def _append(self, name: str, record: dict[str, Any], x: int) -> None:
        if self.out_dir is None:
            return
        with (self.out_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in flatten({k: v for k, v in record.items() if k not in ("step", "epoch")}).items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, x)
