"""Tabular files (CSV, Parquet): named feature columns, task columns, empty cell = no label.

A table becomes one float input per row, ``[categorical codes | standardised numbers]``, which
:class:`mtlkit.nn.TabularEmbedding` turns into embeddings and numbers. Category vocabularies
and the numeric means and standard deviations come from the training split only; a category
first seen in validation or test maps to code 0, the one out-of-vocabulary index.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.data._bundle import DatasetBundle, MultiTaskTensorDataset
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.tasks import Task

#: task kinds of a tabular task column
TASK_KINDS = ("binary", "multiclass", "regression")
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}

Table = dict[str, list[str | None]]  # column -> cells (None: empty)


def read_table(path: Path, columns: Sequence[str], *, header: Sequence[str] | None = None,
               name: str = "tabular") -> Table:
    """The named columns of a CSV or Parquet file, as strings (``None`` for an empty cell).

    Args:
        path: a ``.csv`` file (first line: the column names, unless ``header`` is given) or a
            ``.parquet`` file (needs pyarrow).
        columns: the columns to return.
        header: column names of a CSV file without a header line.
        name: the dataset name, for messages.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a named column is missing, or a row has the wrong number of cells.
        ImportError: a Parquet file without pyarrow installed.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{name}: missing file {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path, columns, name)
    with path.open(newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)
        names = list(header) if header is not None else next(reader, None)
        if not names:
            raise ValueError(f"{name}: {path} is empty; expected a header line with column names")
        names = [n.strip() for n in names]
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{name}: {path} has no column(s) {missing}; its columns are {names}")
        where = [names.index(c) for c in columns]
        out: Table = {c: [] for c in columns}
        for number, row in enumerate(reader, start=1 if header is not None else 2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(names):
                raise ValueError(
                    f"{name}: {path} line {number} has {len(row)} cells, expected {len(names)}"
                )
            for c, i in zip(columns, where):
                cell = row[i].strip()
                out[c].append(cell if cell else None)
    return out


def _read_parquet(path: Path, columns: Sequence[str], name: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{name}: reading {path} needs pyarrow (pip install pyarrow); or give a CSV file"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise ValueError(f"{name}: {path} is not a readable Parquet file ({err})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{name}: {path} has no column(s) {missing}; its columns are {table.column_names}"
        )
    data = table.select(list(columns)).to_pydict()

    def text(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, bool):
            return "1" if v else "0"
        s = str(v).strip()
        return s or None

    return {c: [text(v) for v in data[c]] for c in columns}


@dataclass(frozen=True)
class TabularTask:
    """A task read from a table column.

    Args:
        name: the task name.
        column: the column holding its labels (default: ``name``).
        kind: ``binary`` (0/1, also true/false), ``multiclass`` (any values: the classes are
            the sorted values found in all splits) or ``regression`` (numbers, kept raw).
        entire_space: for a binary task, a binary column that gates it, as ESMM's
            post-click conversion: the target is ``entire_space AND column`` over every row,
            so a row where ``entire_space`` is 0 is a labelled negative even if ``column`` is
            empty (Ma et al., SIGIR 2018, arXiv:1804.07931). Empty where the gate is empty, or
            is 1 and ``column`` is empty.
    """

    name: str
    column: str
    kind: str
    entire_space: str | None = None

    @classmethod
    def parse(cls, name: str, spec: str | Mapping[str, Any]) -> TabularTask:
        """``spec``: a kind, or a mapping with ``kind`` and optionally ``column``,
        ``entire_space``."""
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(f"tasks.{name} must be a kind or a mapping, got {spec!r}")  # noqa: TRY004
        unknown = sorted(set(spec) - {"kind", "column", "entire_space"})
        if unknown:
            raise ValueError(f"tasks.{name}: unknown field(s) {unknown}; fields are "
                             "kind, column, entire_space")
        kind = spec.get("kind")
        if kind not in TASK_KINDS:
            raise ValueError(f"tasks.{name}.kind must be one of {list(TASK_KINDS)}, got {kind!r}")
        gate = spec.get("entire_space")
        if gate is not None and kind != "binary":
            raise ValueError(f"tasks.{name}.entire_space applies to binary tasks only")
        return cls(name, str(spec.get("column", name)), str(kind),
                   None if gate is None else str(gate))


class TabularEncoder:
    """Categorical vocabularies and numeric statistics fitted on the training rows.

    Codes: 0 is the out-of-vocabulary index (a category absent from the training split), the
    training categories are 1..V in sorted order. Numbers are ``(v - mean) / std`` with the
    training mean and (population) standard deviation, 1 where that is 0; an empty numeric
    cell becomes the training mean (0 after standardising).

    Example:
        >>> enc = TabularEncoder(["city"], ["age"]).fit({"city": ["b", "a"], "age": ["20", "40"]})
        >>> enc.cardinalities
        [3]
        >>> enc.transform({"city": ["a", "z"], "age": ["30", None]}).tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """

    def __init__(self, categorical: Sequence[str], numeric: Sequence[str], name: str = "tabular"
                 ) -> None:
        self.categorical = list(categorical)
        self.numeric = list(numeric)
        self.name = name
        self.vocab: dict[str, dict[str, int]] = {}
        self.mean: dict[str, float] = {}
        self.std: dict[str, float] = {}

    @property
    def cardinalities(self) -> list[int]:
        """Codes per categorical column, the out-of-vocabulary code 0 included."""
        return [len(self.vocab[c]) + 1 for c in self.categorical]

    def fit(self, table: Table) -> TabularEncoder:
        for c in self.categorical:
            values = sorted({v if v is not None else "" for v in table[c]})
            self.vocab[c] = {v: i + 1 for i, v in enumerate(values)}
        for c in self.numeric:
            col = self._numbers(table[c], c)
            seen = col[~np.isnan(col)]
            mean = float(seen.mean()) if seen.size else 0.0
            std = float(seen.std()) if seen.size else 0.0
            self.mean[c], self.std[c] = mean, std if std > 0 else 1.0
        return self

    def _numbers(self, cells: Sequence[str | None], column: str) -> np.ndarray:
        out = np.empty(len(cells), dtype=np.float64)
        for i, v in enumerate(cells):
            try:
                out[i] = math.nan if v is None else float(v)
            except ValueError:
                raise ValueError(
                    f"{self.name}: numeric column {column!r} holds {v!r} (row {i + 1})"
                ) from None
        return out

    def transform(self, table: Table) -> torch.Tensor:
        n = len(next(iter(table.values()))) if table else 0
        x = np.zeros((n, len(self.categorical) + len(self.numeric)), dtype=np.float32)
        for j, c in enumerate(self.categorical):
            vocab = self.vocab[c]
            x[:, j] = [vocab.get(v if v is not None else "", 0) for v in table[c]]
        for j, c in enumerate(self.numeric, start=len(self.categorical)):
            col = (self._numbers(table[c], c) - self.mean[c]) / self.std[c]
            x[:, j] = np.nan_to_num(col, nan=0.0)
        return torch.from_numpy(x)


def _binary(cells: Sequence[str | None], where: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.zeros(len(cells), dtype=np.int64)
    known = np.zeros(len(cells), dtype=bool)
    for i, v in enumerate(cells):
        if v is None:
            continue
        s = v.lower()
        if s in _TRUE:
            y[i] = 1
        elif s not in _FALSE:
            raise ValueError(f"{where} holds {v!r} (row {i + 1}); a binary label is 0 or 1")
        known[i] = True
    return y, known


def encode_targets(
    table: Table, tasks: Sequence[TabularTask], classes: Mapping[str, list[str]], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Targets and masks (True = labelled) of each task; ``where`` names the file."""
    targets, masks = {}, {}
    for t in tasks:
        cells = table[t.column]
        if t.kind == "binary":
            y, known = _binary(cells, f"{where} column {t.column!r}")
            if t.entire_space is not None:
                gate, gate_known = _binary(table[t.entire_space],
                                           f"{where} column {t.entire_space!r}")
                negative = gate_known & (gate == 0)  # not clicked: no conversion, labelled
                known = negative | (gate_known & known)
                y = np.where(negative, 0, y)
            targets[t.name] = torch.from_numpy(y)
        elif t.kind == "multiclass":
            index = {c: i for i, c in enumerate(classes[t.name])}
            known = np.array([v is not None for v in cells])
            targets[t.name] = torch.tensor([index[v] if v is not None else 0 for v in cells],
                                           dtype=torch.int64)
        else:
            y = np.zeros(len(cells), dtype=np.float32)
            known = np.zeros(len(cells), dtype=bool)
            for i, v in enumerate(cells):
                if v is None:
                    continue
                try:
                    y[i] = float(v)
                except ValueError:
                    raise ValueError(f"{where} column {t.column!r} holds {v!r} (row {i + 1}); "
                                     "a regression label is a number") from None
                known[i] = math.isfinite(y[i])
                y[i] = y[i] if known[i] else 0.0
            targets[t.name] = torch.from_numpy(y)
        masks[t.name] = torch.from_numpy(np.asarray(known, dtype=bool))
    return targets, masks


def tasks_of(specs: Sequence[TabularTask], classes: Mapping[str, list[str]]) -> tuple[Task, ...]:
    """The mtlkit tasks: binary and multiclass tasks are classifications, regression MSE."""
    out = []
    for t in specs:
        if t.kind == "binary":
            out.append(Task.classification(t.name, 2, primary="auc"))
        elif t.kind == "multiclass":
            if len(classes[t.name]) < 2:
                raise ValueError(f"tasks.{t.name}: a multiclass task needs 2 classes or more, "
                                 f"found {classes[t.name]}")
            out.append(Task.classification(t.name, len(classes[t.name])))
        else:
            out.append(Task.regression(t.name))
    return tuple(out)


def _names(value: Iterable[str] | None, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field} must be a list of column names, got {value!r}")
    return list(value)


def _split_rows(n: int, seed: int, val_fraction: float, test_fraction: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for field, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{field} must be in [0, 1), got {v!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n - n_test - n_val < 1 or (val_fraction > 0 and n_val == 0):
        raise ValueError(f"tabular: {n} rows cannot be split with val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    return (np.sort(order[n_test + n_val:]), np.sort(order[n_test:n_test + n_val]),
            np.sort(order[:n_test]))


def _take(table: Table, rows: np.ndarray) -> Table:
    return {c: [v[i] for i in rows] for c, v in table.items()}


def build_tabular(
    name: str,
    splits: Mapping[str, Table],
    files: Mapping[str, str],
    categorical: Sequence[str],
    numeric: Sequence[str],
    specs: Sequence[TabularTask],
    *,
    model: str,
    model_options: Mapping[str, Any],
    info: Mapping[str, Any],
) -> DatasetBundle:
    """A bundle from three tables: the encoder is fitted on ``splits["train"]`` only."""
    encoder = TabularEncoder(categorical, numeric, name).fit(splits["train"])
    classes = {
        t.name: sorted({v for s in splits.values() for v in s[t.column] if v is not None})
        for t in specs if t.kind == "multiclass"
    }
    datasets = {}
    any_missing = False
    encoded = {}
    for split, table in splits.items():
        y, m = encode_targets(table, specs, classes, files[split])
        any_missing |= any(not bool(v.all()) for v in m.values())
        encoded[split] = (encoder.transform(table), y, m)
    for split, (x, y, m) in encoded.items():
        if len(x) == 0:
            raise ValueError(f"{name}: the {split} split ({files[split]}) has no row")
        datasets[split] = MultiTaskTensorDataset(x, y, m if any_missing else None)
    tasks = tasks_of(specs, classes)
    options = {"cardinalities": encoder.cardinalities, "num_numeric": len(encoder.numeric),
               **model_options}
    details = {
        **info,
        "categorical": list(categorical),
        "numeric": list(numeric),
        "cardinalities": encoder.cardinalities,
        "vocabularies": {c: list(v) for c, v in encoder.vocab.items()},
        "numeric_mean": encoder.mean,
        "numeric_std": encoder.std,
        "classes": classes,
        "labelled": {s: {t: int(v.sum()) for t, v in e[2].items()} for s, e in encoded.items()},
    }
    return DatasetBundle(name, datasets["train"], datasets["val"], datasets["test"], tasks,
                         (len(categorical) + len(numeric),), details, model, options)


@register("tabular")
def tabular(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    tasks: Mapping[str, str | Mapping[str, Any]] | None = None,
    categorical: Sequence[str] | None = None,
    numeric: Sequence[str] | None = None,
    file: str | None = None,
    train: str | None = None,
    val: str | None = None,
    test: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    model: str = "tabular_mlp",
    model_options: Mapping[str, Any] | None = None,
) -> DatasetBundle:
    """Any table: feature columns in, one task per label column, empty cell = missing label.

    Give either one ``file`` (split at random, seeded, into train / val / test by the
    fractions) or the three files ``train``, ``val``, ``test``; paths are relative to ``root``.
    A ``.csv`` file has a header line; a ``.parquet`` file needs pyarrow (its nulls are empty
    cells). Items are ``(x, {task: y}, {task: mask})`` when some label is empty (``mask``:
    True = labelled), else ``(x, {task: y})``; ``x`` is ``[categorical codes |
    standardised numbers]`` as float32 (see :class:`TabularEncoder`).

    Tasks: ``binary`` and ``multiclass`` columns become classification tasks (2-class logits;
    binary tasks are selected on AUC), ``regression`` columns MSE regression on the raw scale.
    A click + conversion log where conversion is filled only on clicked rows trains as is: a
    task ``{"column": "conversion", "kind": "binary"}`` is labelled on clicked rows only, and
    ``{"column": "conversion", "kind": "binary", "entire_space": "click"}`` is ESMM's
    click-and-convert label on every row.

    Args:
        root: the folder of the files.
        seed: seeds the random split of a single ``file``.
        tasks: task name -> kind, or -> ``{kind, column, entire_space}`` (see
            :class:`TabularTask`).
        categorical: categorical feature columns (embedded by the model).
        numeric: numeric feature columns (standardised on the training split).
        file: one file to split; or ``train``, ``val``, ``test``.
        val_fraction, test_fraction: the split of a single ``file``.
        model: the registered model to train (``tabular_mlp``, ``tabular_mmoe``, ``tabular_cgc``,
            ``esmm``, ``aitm``).
        model_options: options of that model (``embed_dim``, sizes, ...).

    Raises:
        ValueError: no task or feature, a bad option, a missing column, a malformed cell (the
            file and the column are named).
        FileNotFoundError: a file is missing.

    Example:
        >>> import pathlib, tempfile
        >>> from mtlkit import data
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "log.csv").write_text("user,price,click,buy\\n" + "a,1,1,0\\nb,2,0,\\n" * 5)
        >>> b = data.load("tabular", root=d, file="log.csv", categorical=["user"],
        ...               numeric=["price"], tasks={"click": "binary", "buy": "binary"})
        >>> b.task_names, b.input_shape, b.model_options["cardinalities"]
        (['click', 'buy'], (2,), [3])
    """
    path = require_root("tabular", root)
    if not tasks or not isinstance(tasks, Mapping):
        raise ValueError("tabular: tasks must map task names to kinds, e.g. "
                         "{'click': 'binary', 'price': 'regression'}")
    specs = [TabularTask.parse(n, s) for n, s in tasks.items()]
    cat, num = _names(categorical, "categorical"), _names(numeric, "numeric")
    if not cat and not num:
        raise ValueError("tabular: name the feature columns in categorical and/or numeric")
    labels = [c for t in specs for c in (t.column, t.entire_space) if c is not None]
    leak = sorted(set(labels) & set(cat + num))
    if leak:
        raise ValueError(f"tabular: column(s) {leak} are both a feature and a task label")
    columns = list(dict.fromkeys(cat + num + labels))
    if model_options is not None and not isinstance(model_options, Mapping):
        raise ValueError(f"model_options must be a mapping, got {model_options!r}")
    given = {"train": train, "val": val, "test": test}
    if file is not None:
        if any(given.values()):
            raise ValueError("tabular: give either file or train/val/test, not both")
        table = read_table(path / file, columns)
        n = len(table[columns[0]])
        rows = _split_rows(n, seed, val_fraction, test_fraction)
        splits = {s: _take(table, r) for s, r in zip(("train", "val", "test"), rows)}
        files = dict.fromkeys(splits, str(path / file))
    elif all(given.values()):
        files = {s: str(path / f) for s, f in given.items()}  # type: ignore[operator]
        splits = {s: read_table(Path(f), columns) for s, f in files.items()}
    else:
        raise ValueError("tabular: give file=<one table> or all of train, val, test")
    return build_tabular(
        "tabular", splits, files, cat, num, specs, model=model,
        model_options=dict(model_options or {}), info={"root": str(path), "files": files},
    )
