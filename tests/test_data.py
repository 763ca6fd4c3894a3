"""Reading labelled files and encoding labels."""

import json

import numpy as np
import pytest

from esm_index.data import encode_labels, guess_task, load_labelled, read_table
from esm_index.errors import DataFileError, InvalidTargetError


def test_csv_jsonl_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "good film", "title": "a", "label": "pos"}, {"text": "bad", "title": "b", "label": "neg"}]
    (tmp_path / "t.csv").write_text("text,title,label\ngood film,a,pos\nbad,b,neg\n", encoding="utf-8")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for suffix in ("csv", "jsonl", "parquet"):
        data = load_labelled(tmp_path / f"t.{suffix}", ["text", "title"], "label")
        assert data.texts == [("good film", "a"), ("bad", "b")]
        assert data.labels.tolist() == [1, 0] and data.label_names == ["neg", "pos"]


def test_integer_labels_are_kept_as_class_ids():
    labels, names = encode_labels(["0", "2", "2"], "classification")
    assert labels.tolist() == [0, 2, 2] and names == ["0", "2"]  # the classes present


def test_regression_labels_and_task_guess(tmp_path):
    assert guess_task(["0.5", "1.25"]) == "regression"
    assert guess_task(["1", "0"]) == "classification"
    (tmp_path / "r.csv").write_text("text,a,b\nx,0.5,1\ny,1.5,2\n")
    data = load_labelled(tmp_path / "r.csv", ["text"], ["a", "b"])
    assert data.task == "regression" and data.labels.shape == (2, 2)
    with pytest.raises(InvalidTargetError, match="numbers"):
        encode_labels(["1.0", "high"], "regression")


def test_bad_files_give_typed_errors(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataFileError, match="unknown file type"):
        read_table(tmp_path / "t.xlsx")
    (tmp_path / "t.csv").write_text("text,label\na,1\n")
    with pytest.raises(DataFileError, match="no column 'sentence'"):
        load_labelled(tmp_path / "t.csv", ["sentence"], "label")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataFileError, match="cannot read"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "latin.csv").write_bytes(b"text,label\n\xe9\xff,1\n")
    with pytest.raises(DataFileError):
        read_table(tmp_path / "latin.csv")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(InvalidTargetError, match="no rows"):
        load_labelled(tmp_path / "empty.csv", ["text"], "label")
    assert np.asarray(encode_labels(["a", "b"], "classification")[0]).dtype == np.int64
