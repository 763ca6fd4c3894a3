"""Read a table file (CSV, TSV, JSONL, JSON, Parquet) into rows, and a labelled target into
texts plus raw label columns.

No numpy here: the HTTP client reads a target with this module and lets the server encode
the labels (data.labelled), so ``esm-index rank --server`` never imports numpy or torch.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from .errors import DataFileError, InvalidTargetError, plural


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


def read_target(path: str | os.PathLike, text_cols: Sequence[str],
                label_cols: Sequence[str]) -> tuple[list, list[list]]:
    """Texts (a string, or a tuple of strings for several text columns) and the raw values of
    each label column, as the file holds them."""
    rows = read_table(path)
    if not rows:
        raise InvalidTargetError(f"{path}: no rows")
    missing = [c for c in [*text_cols, *label_cols] if c not in rows[0]]
    if missing:
        raise DataFileError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, rows[0]))})")
    texts = [r[text_cols[0]] if len(text_cols) == 1 else tuple(r[c] for c in text_cols) for r in rows]
    return [_as_text(t) for t in texts], [[r[c] for r in rows] for c in label_cols]


def _as_text(t) -> str | tuple:
    if isinstance(t, tuple):
        return tuple("" if x is None else str(x) for x in t)
    return "" if t is None else str(t)
