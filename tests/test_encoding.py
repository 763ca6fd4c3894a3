"""ESM encodings of the store (encoding.py): round trips, score changes, a float16-factor index
that ranks as a float32 one does and exports score-equivalent maps, old indexes read as before,
and bad encodings refused."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, one_line_error, random_esms, read_sample
from esm_index.encoding import ENCODINGS, get_encoding
from esm_index.errors import IndexStoreError, InvalidArgumentError, InvalidESMError
from esm_index.esm import ESM
from esm_index.index import SourceIndex
from esm_index.logme import TargetStats, score_esms
from esm_index.store import Store


def _maps(count=6, dim=32, scale=0.3, seed=0, out_dim=None):
    rng = np.random.default_rng(seed)
    out_dim = out_dim or dim
    w = np.eye(out_dim, dim) + rng.standard_normal((count, out_dim, dim)) * scale / np.sqrt(dim)
    return w.astype(np.float32), (rng.standard_normal((count, out_dim)) * scale).astype(np.float32)


def _metric(w, b):
    aug = np.hstack([np.asarray(w, np.float64), np.asarray(b, np.float64)[:, None]])
    return aug.T @ aug


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("shape", [(32, 32), (20, 32), (40, 32)])
def test_round_trip_sizes_and_error_bounds(name, shape):
    enc = get_encoding(name)
    w, b = _maps(out_dim=shape[0], dim=shape[1])
    for wi, bi in zip(w, b):
        raw = enc.encode(wi, bi)
        assert len(raw) == enc.nbytes(*shape)
        got_w, got_b = (np.asarray(a, np.float32) for a in enc.decode(raw, *shape))
        assert got_w.shape == shape and got_b.shape == (shape[0],)
        if name == "float32":
            np.testing.assert_array_equal(got_w, wi)
            np.testing.assert_array_equal(got_b, bi)
        elif name == "float16":
            np.testing.assert_array_equal(got_w, wi.astype(np.float16).astype(np.float32))
        else:  # float16-factor: an upper triangular rotation of [W, b] with the same metric
            aug = np.hstack([got_w, got_b[:, None]])
            assert not np.tril(aug, -1).any() and (np.diagonal(aug) > 0).all()
            assert not aug[shape[1] + 1:].any()  # rows past d+1 are zero: the output dimension stays D
            metric = _metric(wi, bi)
            assert np.abs(_metric(got_w, got_b) - metric).max() < 4e-3 * np.abs(metric).max()
    factor, f16 = get_encoding("float16-factor"), get_encoding("float16")
    assert factor.nbytes(384, 384) == 148_608 and f16.nbytes(384, 384) == 295_680
    assert factor.nbytes(20, 32) == 2 * sum(33 - i for i in range(20)) and factor.nbytes(40, 32) == 2 * 33 * 34 // 2


def test_a_triangular_map_decodes_to_itself():
    enc = get_encoding("float16-factor")
    rng = np.random.default_rng(3)
    aug = np.triu(np.eye(8, 9) + 0.1 * rng.standard_normal((8, 9)))
    aug[np.diag_indices(8)] = np.abs(aug[np.diag_indices(8)])
    got_w, got_b = enc.decode(enc.encode(aug[:, :8], aug[:, 8]), 8, 8)
    expected = (aug - np.eye(8, 9)).astype(np.float16).astype(np.float64) + np.eye(8, 9)
    np.testing.assert_allclose(np.hstack([got_w, got_b[:, None]]), expected, atol=1e-6)
    w, b = enc.decode(enc.encode(np.eye(8), np.zeros(8)), 8, 8)
    np.testing.assert_array_equal(w, np.eye(8))  # the identity is kept exactly
    assert not b.any()


def test_factor_score_change_is_small_against_score_gaps():
    """On near-identity maps (like the shipped pool's), float16-factor moves every ESM-LogME
    score about as little as float16 does, far less than the scores differ."""
    w, b = _maps(count=20, dim=32, scale=0.5, seed=1)
    rng = np.random.default_rng(2)
    for n in (24, 200):  # the kernel side (n <= D) and the feature side of the scorer
        x = rng.standard_normal((n, 32)) + 0.3
        labels = (x[:, :3].sum(1) + 0.5 * rng.standard_normal(n) > 0.9).astype(int)
        stats = TargetStats.from_embeddings(x, labels)
        exact = score_esms(stats, torch.from_numpy(w), torch.from_numpy(b))
        changes = {}
        for name in ("float16", "float16-factor"):
            enc = get_encoding(name)
            dec = [enc.decode(enc.encode(wi, bi), 32, 32) for wi, bi in zip(w, b)]
            got = score_esms(stats, torch.from_numpy(np.stack([np.asarray(d[0], np.float32) for d in dec])),
                             torch.from_numpy(np.stack([np.asarray(d[1], np.float32) for d in dec])))
            changes[name] = np.abs(got - exact).max()
        gaps = np.diff(np.sort(exact))
        assert changes["float16-factor"] < 1e-3 and changes["float16-factor"] < np.median(gaps) / 10, \
            (changes, np.median(gaps))
        assert changes["float16-factor"] < 5 * changes["float16"] + 1e-5, changes


def _pool(folder, tiny_model, dtype, esms):
    index = SourceIndex.create(folder, tiny_model, esm_dtype=dtype)
    index.add_esms((f"s{i}", e) for i, e in enumerate(esms))
    index.rebuild()
    return index


def test_a_factor_index_ranks_as_a_float32_one(tmp_path, tiny_model):
    esms = random_esms(np.random.default_rng(5), 30, 32, scale=0.5)
    texts, names = read_sample("sms_spam", 120)
    labels = [names.index(n) for n in names]
    rankings = {}
    for dtype in ("float32", "float16-factor"):
        with _pool(tmp_path / dtype, tiny_model, dtype, esms) as index:
            assert index.manifest["esm_dtype"] == dtype and index.verify() == []
            rankings[dtype] = index.rank(texts, labels, top=30, exact=True, method="esm-logme").results
            default = index.rank(texts, labels, top=5, shortlist=12, candidates=24, refine=16)
            assert [r.source for r in default.results] == [r.source for r in rankings[dtype][:5]]
            if dtype != "float32":
                assert index.info()["esm_dtype"] == dtype
                with index.store.env.begin() as txn:
                    raw_sizes = {len(v) for _, v in txn.cursor(db=index.store.db["esm"])}
                assert raw_sizes == {2 * (32 * 33 - 32 * 31 // 2)}
    f32, factor = rankings["float32"], rankings["float16-factor"]
    assert [r.source for r in f32[:5]] == [r.source for r in factor[:5]]
    by_name = {r.source: r.score for r in f32}
    assert max(abs(by_name[r.source] - r.score) for r in factor) < 1e-4


def test_export_of_a_factor_index_writes_score_equivalent_maps(tmp_path, tiny_model):
    """The exported maps are the stored rotations R of [W, b]: valid hfselect folders whose
    ESM-LogME is the original map's, though their output coordinates are not."""
    from esm_index.logme import logme

    esms = random_esms(np.random.default_rng(6), 4, 32, scale=0.5)
    x = np.random.default_rng(7).standard_normal((60, 32))
    labels = (x[:, 0] > 0).astype(int)
    with _pool(tmp_path / "idx", tiny_model, "float16-factor", esms) as index:
        assert index.export(tmp_path / "out") == 4
        for i, original in enumerate(esms):
            again = ESM.load(tmp_path / "out" / f"s{i}")  # safetensors + config, as hfselect writes them
            assert again.weight.dtype == np.float32 and again.weight.shape == (32, 32)
            np.testing.assert_array_equal(again.weight, index.get_esm(f"s{i}").weight)
            assert not np.tril(again.weight, -1).any() and not np.allclose(again.weight, original.weight, atol=0.05)
            assert logme(again.apply(x), labels) == pytest.approx(logme(original.apply(x), labels), abs=1e-4)


def test_the_shipped_index_still_reads_as_float16():
    """An index made before float16-factor existed: float16 bytes, W then b, decoded as before."""
    folder = REPO / "indexes" / "default"
    store = Store(folder, readonly=True)
    try:
        assert store.manifest["esm_dtype"] == "float16" and store.encoding is ENCODINGS["float16"]
        dim, out_dim = store.manifest["dim"], store.manifest["out_dim"]
        sid = int(store.ids()[0])
        with store.env.begin() as txn:
            raw = bytes(txn.get(sid.to_bytes(8, "big"), db=store.db["esm"]))
        arr = np.frombuffer(raw, "<f2").astype(np.float32)
        _, w, b = store.esms([sid])
        np.testing.assert_array_equal(w[0], arr[:out_dim * dim].reshape(out_dim, dim))
        np.testing.assert_array_equal(b[0], arr[out_dim * dim:])
        assert store.check() == []
    finally:
        store.close()


def _set_manifest(folder, **fields):
    store = Store(folder)
    try:
        with store.env.begin(write=True) as txn:
            manifest = {**json.loads(txn.get(b"manifest", db=store.db["info"])), **fields}
            txn.put(b"manifest", json.dumps(manifest).encode(), db=store.db["info"])
    finally:
        store.close()


def test_bad_encodings_are_refused(tmp_path, tiny_model, runner):
    from esm_index.cli import main

    with pytest.raises(InvalidArgumentError, match="int4"):
        SourceIndex.create(tmp_path / "a", tiny_model, esm_dtype="int4")
    assert not (tmp_path / "a").exists()
    result = runner.invoke(main, ["init", str(tmp_path / "b"), "--model", str(tiny_model), "--dtype", "int4"])
    assert result.exit_code == 2 and "int4" in result.output and "Traceback" not in result.output
    choices = next(p for p in main.commands["init"].params if p.name == "esm_dtype").type.choices
    assert sorted(choices) == sorted(ENCODINGS)  # the CLI offers every encoding (it lists them without numpy)
    made = runner.invoke(main, ["init", str(tmp_path / "c"), "--model", str(tiny_model), "--dtype", "float16-factor"])
    assert made.exit_code == 0, made.output
    with SourceIndex(tmp_path / "c", readonly=True) as index:
        assert index.manifest["esm_dtype"] == "float16-factor"
    with pytest.raises(InvalidESMError):
        get_encoding("float16-factor").encode(np.eye(4), np.array([0, 0, 1e6, 0]))  # R does not fit in float16
    with pytest.raises(InvalidESMError):
        get_encoding("float16-factor").encode(np.full((4, 4), np.nan), np.zeros(4))

    with _pool(tmp_path / "idx", tiny_model, "float16-factor", random_esms(np.random.default_rng(7), 3, 32)) as index:
        folder = index.folder
    _set_manifest(folder, esm_dtype="float16")  # the bytes no longer fit: noticed, with the source
    with SourceIndex(folder, readonly=True) as index:
        assert any("source" in p and "bytes" in p for p in index.verify())
        with pytest.raises(IndexStoreError, match="source"):
            index.get_esm("s0")
    _set_manifest(folder, esm_dtype="int3")  # an encoding this version does not know
    with SourceIndex(folder, readonly=True) as index:
        with pytest.raises(IndexStoreError, match="int3"):
            index.get_esm("s0")
    error = one_line_error(runner.invoke(main, ["export", str(folder), str(tmp_path / "out")]))
    assert "int3" in error
