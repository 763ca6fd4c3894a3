"""Bounded memory over a real LMDB store (tiny in-process BERT): the exact scan streams the
pool in batches and ranks as one batch would, and a reprobe is staged, so that an
interrupted one leaves the old summaries current."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import esm_index.store as store_module
from conftest import REPO, random_esms, read_sample
from esm_index.cli import main
from esm_index.domain import DOMAIN_KEY, combine, similarities
from esm_index.errors import InvalidArgumentError
from esm_index.index import SourceIndex
from esm_index.logme import TargetStats, score_esms
from esm_index.results import METHODS, Filters
from esm_index.summary import summarize, summary_dim


@pytest.fixture
def index(tmp_path, tiny_model):
    with SourceIndex.create(tmp_path / "idx", tiny_model) as ix:
        yield ix


def _fill(index, count, seed=0):
    """Sources with domain vectors (two in three), so "combined" is not ESM-LogME."""
    rng = np.random.default_rng(seed + 100)
    esms = random_esms(np.random.default_rng(seed), count, 32, scale=1.0)
    for i, e in enumerate(esms):
        e.meta.update({"task_id": f"s{seed}-{i}", "language": "en" if i % 2 else "de"})
        if i % 3:
            e.meta[DOMAIN_KEY] = rng.standard_normal(32).round(6).tolist()
    index.add_esms((f"s{seed}-{i}", e) for i, e in enumerate(esms))


def _target(index, n=80):
    texts, names = read_sample("movie_reviews", n)
    return index.embed(texts), np.asarray([x == "fresh" for x in names], int)


def test_iter_esms_gives_the_stored_maps_in_batches(index):
    _fill(index, 17)
    ids = index.store.ids()
    batches = list(index.store.iter_esms(batch=5, metas=True))
    assert [len(b[0]) for b in batches] == [5, 5, 5, 2]
    found, w, b = index.store.esms(ids)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), found)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), w)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), b)
    assert [m["name"] for b in batches for m in b[3]] == [m["name"] for m in index.store.metas(ids)]
    wanted = [int(ids[3]), 10_000, int(ids[1])]  # in the order given, a missing id skipped
    (got_ids, got_w, _, metas), = index.store.iter_esms(wanted, batch=2)
    assert got_ids.tolist() == [ids[3], ids[1]] and metas is None
    np.testing.assert_array_equal(got_w, w[[3, 1]])


def test_the_streamed_exact_scan_ranks_as_one_batch(index, monkeypatch):
    """Several batches of 4 against one batch, for every method, with and without a filter;
    and against the scorer given the whole pool at once (the code before streaming)."""
    _fill(index, 30)
    index.rebuild()
    x, y = _target(index)
    for method in METHODS:
        for filters in (None, Filters(language="en")):
            monkeypatch.setattr(store_module, "SCAN_BATCH", 4)
            streamed = index.rank_embeddings(x, y, top=30, exact=True, method=method, filters=filters)
            monkeypatch.setattr(store_module, "SCAN_BATCH", 10_000)
            whole = index.rank_embeddings(x, y, top=30, exact=True, method=method, filters=filters)
            assert streamed.results == whole.results and len(streamed.results) == (30 if filters is None else 15)
            if method == "combined" and filters is None:
                combined = streamed
    ids, w, b = index.store.esms(index.store.ids())
    logme = score_esms(TargetStats.from_embeddings(x, y), torch.from_numpy(w), torch.from_numpy(b))
    scores = combine(logme, similarities(x, index.store.metas(ids)), "combined")
    order = np.lexsort((-logme, -scores))
    assert [r.source for r in combined.results] == [f"s0-{i - 1}" for i in ids[order]]  # ids are 1..30
    assert [r.score for r in combined.results] == scores[order].tolist()
    assert [r.esm_logme for r in combined.results] == logme[order].tolist()
    assert np.unique(scores).size == 30 and not np.array_equal(np.argsort(-scores), np.argsort(-logme))


def _table_rows(store, name):
    with store.env.begin() as txn:
        return txn.stat(store.db[name])["entries"]


def test_an_interrupted_reprobe_leaves_the_old_summaries_current(index):
    _fill(index, 30)
    index.rebuild()  # the first rebuild fits the probe: one full reprobe already
    x, y = _target(index)
    query = dict(top=5, shortlist=8, candidates=16, refine=12)
    before = index.rank_embeddings(x, y, **query)
    generation, probe = index.store.generation(), index.store.probe()
    _, summaries = index.store.summaries()
    new_probe, calls = probe[:, ::-1].copy(), []

    def killed_in_the_second_chunk(w, b):
        calls.append(len(w))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return summarize(w, b, new_probe)

    with pytest.raises(RuntimeError, match="killed"):
        index.store.reprobe(new_probe, killed_in_the_second_chunk, {"probe_pool_sample": -1}, batch=2, chunk=4)
    assert calls == [2, 2, 2]
    staged = next(t for t in store_module.SUMMARY_TABLES if _table_rows(index.store, t) == 4)  # chunk 1 committed
    assert index.store.generation() == generation and index.store.manifest.get("probe_pool_sample") != -1
    np.testing.assert_array_equal(index.store.probe(), probe)
    np.testing.assert_array_equal(index.store.summaries()[1], summaries)
    assert index.verify() == []
    again = index.rank_embeddings(x, y, **query)
    assert again.results == before.results

    index.rebuild(reprobe=True)  # a complete one clears the leftovers, switches, empties the old table
    assert index.verify() == [] and index.store.generation() > generation
    ids, now = index.store.summaries()
    assert _table_rows(index.store, staged) == len(ids) == 30
    assert sum(_table_rows(index.store, t) for t in store_module.SUMMARY_TABLES) == 30
    _, w, b = index.store.esms(ids)
    np.testing.assert_allclose(now, summarize(w, b, index.probe), rtol=1e-5, atol=1e-6)


def test_a_reprobe_can_change_the_probe_size(index, runner, tiny_model):
    """A larger (or smaller) probe for a grown pool: every summary recomputed at the new
    width, the manifest saying so, the prefilter rebuilt on them; a size the stored reference
    directions cannot fill, or a pool too small to fit one on, is refused before anything
    changes."""
    _fill(index, 30)
    index.rebuild()
    assert index.probe.shape[1] == 33  # the tiny model: d + 1 = 33 directions
    x, y = _target(index)
    exact = index.rank_embeddings(x, y, top=5, exact=True)
    generation = index.store.generation()
    with pytest.raises(InvalidArgumentError, match="a probe of 2 to 33"):
        index.rebuild(reprobe=True, probe_dim=40)
    with pytest.raises(InvalidArgumentError, match="needs a reprobe"):
        index.rebuild(probe_dim=20)
    assert index.store.generation() == generation and index.manifest["summary_dim"] == summary_dim(33)

    index.rebuild(reprobe=True, probe_dim=20)
    assert index.probe.shape == (33, 20) and index.manifest["summary_dim"] == summary_dim(20) == 210
    assert "U: 20 directions" in index.manifest["summary"]
    ids, now = index.store.summaries()
    _, w, b = index.store.esms(ids)
    np.testing.assert_allclose(now, summarize(w, b, index.probe), rtol=1e-5, atol=1e-6)
    assert index.verify() == []
    prefiltered = index.rank_embeddings(x, y, top=5, shortlist=8, candidates=16, refine=12)
    assert len(prefiltered.results) == 5 and {r.source for r in prefiltered.results} <= {f"s0-{i}" for i in range(30)}
    assert index.rank_embeddings(x, y, top=5, exact=True).results == exact.results  # the maps are untouched

    folder = str(index.folder)
    index.close()
    small = runner.invoke(main, ["init", str(index.folder.parent / "small"), "--model", str(tiny_model)])
    assert small.exit_code == 0, small.output
    few = runner.invoke(main, ["rebuild", str(index.folder.parent / "small"), "--reprobe", "--probe-dim", "20"])
    assert few.exit_code == 2 and "at least 8 sources" in few.output
    bad = runner.invoke(main, ["rebuild", folder, "--reprobe", "--probe-dim", "99"])
    assert bad.exit_code == 2 and "reference directions" in bad.output and "Traceback" not in bad.output
    good = runner.invoke(main, ["rebuild", folder, "--reprobe", "--probe-dim", "24"])
    assert good.exit_code == 0, good.output
    with SourceIndex(folder, readonly=True) as again:
        assert again.manifest["summary_dim"] == summary_dim(24) and again.verify() == []


def test_sources_added_or_removed_while_staging_are_reconciled(index):
    _fill(index, 20)
    index.rebuild()
    probe = index.store.probe() * 0.5
    fresh = lambda w, b: summarize(w, b, probe)  # noqa: E731
    staged = index.store.stage_summaries(fresh, batch=4, chunk=6)
    _fill(index, 5, seed=1)  # another writer, between staging and the switch (old-probe summaries)
    assert index.remove(["s0-3"]) == []
    index.store.switch_summaries(staged, probe, fresh, {})
    assert index.store.check() == []
    ids, got = index.store.summaries()
    assert len(ids) == 24
    _, w, b = index.store.esms(ids)
    np.testing.assert_allclose(got, fresh(w, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(index.store.probe(), probe)


REPROBER = """
import sys
sys.path.insert(0, {repo!r})
from esm_index.store import Store
from esm_index.summary import summarize
store = Store({folder!r})
probe = store.probe() * 0.5
store.reprobe(probe, lambda w, b: summarize(w, b, probe), {{}}, chunk=7)
"""


def test_a_reader_open_before_another_process_reprobes_reads_the_new_table(index):
    """Opening an index makes no table (it writes nothing); the second summary table made
    by another process's reprobe is opened when the switch points at it."""
    _fill(index, 20)  # fewer than 8 at creation: no reprobe yet
    store = index.store
    assert "summary_b" not in store.db
    generation = store.generation()
    subprocess.run([sys.executable, "-c", REPROBER.format(repo=str(REPO), folder=str(index.folder))], check=True)
    ids, got = store.summaries()
    assert "summary_b" in store.db and store.generation() == generation + 1 and len(ids) == 20
    _, w, b = store.esms(ids)
    np.testing.assert_allclose(got, summarize(w, b, store.probe()), rtol=1e-5, atol=1e-6)
    assert store.check() == [] and _table_rows(store, "summary") == 0
