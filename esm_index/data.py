"""Labelled text data: read CSV / JSONL / Parquet, pick columns, encode labels.

A target (or a source to fine-tune on) is texts plus labels. Classification labels become
class ids: integer labels are kept as they are (so scores match hfselect, which regresses on
classes 0..max(label)), any other labels are numbered in sorted order. Regression labels are
floats, one column or several.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataFileError, InvalidTargetError, plural

TASKS = ("classification", "regression")


@dataclass
class LabelledData:
    """Texts (a string, or a tuple of strings for several text columns) and their labels."""

    texts: list
    labels: np.ndarray  # (n,) int class ids, or (n,) / (n, k) floats for regression
    task: str = "classification"
    label_names: list[str] | None = None  # the classes present, in class-id order

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def regression(self) -> bool:
        return self.task == "regression"


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv / .tsv / .jsonl / .json / .parquet file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                return _checked_rows(path, csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataFileError(f"{path}: expected a JSON list of objects")
            return rows
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError) as exc:
        raise DataFileError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # pyarrow raises its own error types
        if exc.__class__.__module__.startswith("pyarrow"):
            raise DataFileError(f"{path}: cannot read Parquet ({exc})") from None
        raise
    raise DataFileError(f"{path}: unknown file type {suffix!r} (use .csv, .tsv, .jsonl, .json or .parquet)")


def _checked_rows(path: Path, reader: csv.DictReader) -> list[dict]:
    """The rows, refusing any whose field count differs from the header's. An unterminated
    quote swallows the rest of the file into one field, which would otherwise surface much
    later as a puzzling "some labels are empty"."""
    rows = []
    for row in reader:
        if None in row or None in row.values():
            fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
            raise DataFileError(f"{path}: the row ending on line {reader.line_num} has {plural(fields, 'field')}, "
                                f"the header {len(reader.fieldnames)} (an unterminated quote or a stray delimiter?)")
        rows.append(row)
    return rows


def encode_labels(values: Sequence, task: str) -> tuple[np.ndarray, list[str] | None]:
    """Class ids (and names) for classification, floats for regression."""
    if task not in TASKS:
        raise InvalidTargetError(f"task must be one of {TASKS}, not {task!r}")
    if len(values) == 0:
        raise InvalidTargetError("the target has no examples")
    if task == "regression":
        try:
            return np.asarray(values, dtype=np.float64), None
        except (TypeError, ValueError):
            bad = next((v for v in values if not _is_number(v)), None)
            raise InvalidTargetError(f"regression labels must be numbers, got {bad!r}") from None
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        raise InvalidTargetError("some labels are empty")
    if all(_is_int(v) for v in values):
        ints = [int(float(v)) for v in values]
        if min(ints) >= 0 and max(ints) < 2 ** 62:
            ids = np.asarray(ints, dtype=np.int64)
            return ids, [str(i) for i in np.unique(ids)]  # the classes present, not 0..max
    names = sorted({str(v) for v in values})
    lookup = {name: i for i, name in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in values], dtype=np.int64), names


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    try:
        return float(v) == int(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


def guess_task(values: Sequence) -> str:
    """Regression when every label is a number and some are not whole; else classification."""
    if values and all(_is_number(v) for v in values) and not all(_is_int(v) for v in values):
        return "regression"
    return "classification"


def load_labelled(path: str | os.PathLike, text_cols: Sequence[str], label_cols: Sequence[str] | str,
                  task: str | None = None) -> LabelledData:
    """Read a labelled file. Several ``text_cols`` make text tuples; several ``label_cols``
    are regression targets."""
    label_cols = [label_cols] if isinstance(label_cols, str) else list(label_cols)
    rows = read_table(path)
    if not rows:
        raise InvalidTargetError(f"{path}: no rows")
    missing = [c for c in [*text_cols, *label_cols] if c not in rows[0]]
    if missing:
        raise DataFileError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, rows[0]))})")
    texts = [r[text_cols[0]] if len(text_cols) == 1 else tuple(r[c] for c in text_cols) for r in rows]
    texts = [_as_text(t) for t in texts]
    if len(label_cols) > 1:
        if task not in (None, "regression"):
            raise InvalidTargetError("several label columns are only supported for regression")
        cols = [encode_labels([r[c] for r in rows], "regression")[0] for c in label_cols]
        return LabelledData(texts, np.stack(cols, 1), "regression")
    values = [r[label_cols[0]] for r in rows]
    task = task or guess_task(values)
    labels, names = encode_labels(values, task)
    return LabelledData(texts, labels, task, names)


def _as_text(t) -> str | tuple:
    if isinstance(t, tuple):
        return tuple("" if x is None else str(x) for x in t)
    return "" if t is None else str(t)
