"""Labelled text data: texts plus encoded labels (reading the files is tables.py's part).

A target (or a source to fine-tune on) is texts plus labels. Classification labels become
class ids: integer labels are kept as they are (so scores match hfselect, which regresses on
classes 0..max(label)), any other labels are numbered in sorted order. Regression labels are
floats, one column or several.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidTargetError
from .tables import read_table, read_target  # noqa: F401 - read_table stays importable from here

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
    texts, columns = read_target(path, text_cols, label_cols)
    return labelled(texts, columns, task)


def labelled(texts: list, columns: Sequence[Sequence], task: str | None = None) -> LabelledData:
    """Texts plus the raw values of one label column (or several regression columns), encoded
    as a file's labels are, the task guessed when not given. The server encodes targets sent
    as JSON with it, so a remote query means what a local one does."""
    if len(columns) > 1:
        if task not in (None, "regression"):
            raise InvalidTargetError("several label columns are only supported for regression")
        cols = [encode_labels(list(c), "regression")[0] for c in columns]
        return LabelledData(texts, np.stack(cols, 1), "regression")
    values = list(columns[0])
    task = task or guess_task(values)
    labels, names = encode_labels(values, task)
    return LabelledData(texts, labels, task, names)
