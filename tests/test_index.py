"""SourceIndex over a real LMDB store and real FAISS files, with a tiny in-process BERT."""

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, random_esms, read_sample
from esm_index.errors import IndexStoreError, InvalidESMError, InvalidTargetError, ModelMismatchError
from esm_index.esm import ESM
from esm_index.index import SourceIndex
from esm_index.results import Filters
from esm_index.prefilter import FAISS_FILE


@pytest.fixture
def index(tmp_path, tiny_model):
    with SourceIndex.create(tmp_path / "idx", tiny_model) as ix:
        yield ix


def _target(n=120, seed=0):
    texts, names = read_sample("movie_reviews", n)
    return texts, np.asarray([names.index(x) for x in names]) * 0 + np.asarray([x == "fresh" for x in names], int)


def _fill(index, count=40, seed=0, **meta):
    esms = random_esms(np.random.default_rng(seed), count, 32, scale=1.0)
    for i, e in enumerate(esms):
        e.meta.update({"task_id": f"s{seed}-{i}", "language": "en" if i % 2 else "de", "num_examples": 100 * i,
                       "tags": ["sentiment"] if i % 3 == 0 else [], **meta})
    return index.add_esms((f"s{seed}-{i}", e) for i, e in enumerate(esms))


def test_add_rank_and_resume(index):
    assert _fill(index) == (40, 0)
    assert _fill(index) == (0, 40)  # re-running an import duplicates nothing
    index.rebuild()
    assert len(index) == 40 and index.verify() == []
    texts, labels = _target()
    exact = index.rank(texts, labels, top=40, exact=True)
    assert [r.rank for r in exact.results] == list(range(1, 41))
    assert all(a.score >= b.score for a, b in zip(exact.results, exact.results[1:]))
    fast = index.rank(texts, labels, top=5, shortlist=20)
    assert {r.source: r.score for r in fast.results}.items() <= {r.source: r.score for r in exact.results}.items()
    assert fast.results[0].approximate_score is not None and fast.pool_size == 40
    assert all(r.faiss_score is r.approximate_score is r.refining_score is None for r in exact.results)


def test_every_prefilter_stage_runs_and_keeps_the_best(index):
    """A pool larger than ``candidates``: FAISS (local linear score per K-means cell), the
    approximate stage, the refining stage and the exact rerank all run, and the exact top-3
    survives them. The pool is built like tools/bench/bench_query.py's: mixtures of a few maps."""
    rng = np.random.default_rng(3)
    seeds = random_esms(rng, 8, 32, scale=0.5)
    for i in range(700):
        pick, mix = rng.choice(8, 3, replace=False), rng.dirichlet(np.full(3, 0.5))
        w = sum(m * seeds[j].weight for m, j in zip(mix, pick)) + 0.01 * rng.standard_normal((32, 32))
        b = sum(m * seeds[j].bias for m, j in zip(mix, pick))
        index.add_esm(f"r{i}", ESM(w, b, {}))
    index.rebuild()
    assert index.verify() == [] and index.prefilter().ivf.nlist > 1
    texts, labels = _target()
    exact = index.rank(texts, labels, top=3, exact=True)
    fast = index.rank(texts, labels, top=8, shortlist=8, candidates=64, refine=16)
    assert set(fast.timings) >= {"faiss", "approximate", "refining", "exact"}
    assert all(None not in (r.faiss_score, r.approximate_score, r.refining_score) for r in fast.results)
    assert {r.source for r in exact.results} <= {r.source for r in fast.results}


def test_first_rebuild_fits_the_probe_to_the_pool(index):
    from esm_index.summary import summarize

    _fill(index, 12)
    before = index.probe.copy()
    index.rebuild()
    assert index.manifest["probe_pool_fitted"] and not np.allclose(before, index.probe)
    np.testing.assert_allclose(index.probe.T @ index.probe, np.eye(index.probe.shape[1]), atol=1e-5)
    ids, vecs = index.store.summaries()
    _, w, b = index.store.esms(ids)
    np.testing.assert_allclose(vecs, summarize(w, b, index.probe), rtol=1e-4, atol=1e-4)
    reader = SourceIndex(index.folder, readonly=True)
    np.testing.assert_array_equal(reader.probe, index.probe)
    assert index.verify() == []


def test_scores_equal_a_direct_computation(index):
    _fill(index, 5)
    texts, labels = _target()
    ranking = index.rank(texts, labels, top=5, exact=True)
    from esm_index.logme import logme

    x = index.embed(texts)
    best = index.get_esm(ranking.results[0].source)
    # float16 storage: the stored map is the float16 rounding of the one added
    assert ranking.results[0].score == pytest.approx(logme(best.apply(x), labels), abs=1e-6)


def test_metadata_filters(index):
    _fill(index, 30)
    index.rebuild()
    texts, labels = _target()
    ranking = index.rank(texts, labels, top=4, filters=Filters(language="de", tags=["sentiment"]), shortlist=4)
    assert ranking.results and all(r.meta["language"] == "de" and "sentiment" in r.meta["tags"]
                                   for r in ranking.results)
    sizes = index.rank(texts, labels, top=30, filters=Filters(min_size=2000), exact=True)
    assert all(r.meta["num_examples"] >= 2000 for r in sizes.results) and len(sizes.results) == 10


def test_remove_export_and_reimport(index, tmp_path):
    _fill(index, 6)
    assert index.remove(["s0-1", "nope"]) == ["nope"]
    assert len(index) == 5
    assert index.export(tmp_path / "out") == 5
    again = ESM.load(tmp_path / "out" / "s0-2")
    np.testing.assert_array_equal(again.weight, index.get_esm("s0-2").weight)


def test_model_mismatch_and_bad_weights_are_refused(index):
    with pytest.raises(ModelMismatchError):
        index.add_esm("big", ESM(np.eye(48), np.zeros(48)))
    other = ESM(np.eye(32), np.zeros(32), {"base_model_name": "bert-base-uncased"})
    with pytest.raises(ModelMismatchError, match="bert-base-uncased"):
        index.add_esm("other", other)
    with pytest.raises(InvalidESMError, match="float16"):
        index.add_esm("huge", ESM(np.eye(32) * 1e6, np.zeros(32)))
    with pytest.raises(ModelMismatchError):
        index.rank_embeddings(np.zeros((4, 16)), [0, 1, 0, 1])
    with pytest.raises(InvalidTargetError, match="single class"):
        index.rank(["a", "b"], [1, 1])
    with pytest.raises(InvalidTargetError, match="no examples"):
        index.rank([], [])


def test_damaged_or_deleted_faiss_files_are_detected_and_rebuilt(index):
    _fill(index, 10)
    index.rebuild()
    path = index.folder / FAISS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = SourceIndex(index.folder)
    assert any("prefilter" in p for p in fresh.verify())
    texts, labels = _target()
    assert fresh.rank(texts, labels, top=3, shortlist=3).results  # rebuilt on the way
    assert fresh.verify() == []
    path.unlink()
    assert any("prefilter" in p for p in fresh.verify())
    fresh.rebuild()
    assert fresh.verify() == []


def test_a_stale_prefilter_is_noticed(index):
    """Files that are present and intact but older than the store: verify reports them,
    and a reader builds a current prefilter in memory instead of using them."""
    _fill(index, 5)
    index.rebuild()
    assert SourceIndex(index.folder, readonly=True).verify() == []

    def prefilter_files():
        return {p.name: p.read_bytes() for p in index.folder.iterdir() if p.suffix in (".faiss", ".json")}

    written = prefilter_files()
    assert FAISS_FILE in written
    _fill(index, 5, seed=1)  # written after the FAISS files
    reader = SourceIndex(index.folder, readonly=True)
    assert prefilter_files() == written  # the very files that verified clean: not missing, not damaged
    assert any("stale" in p for p in reader.verify())
    assert sorted(reader.prefilter().ids()) == sorted(reader.store.ids()) and len(reader.store.ids()) == 10
    assert prefilter_files() == written  # read-only: rebuilt in memory, nothing written


def test_not_an_index(tmp_path):
    with pytest.raises(IndexStoreError, match="not an esm-index index"):
        SourceIndex(tmp_path)


def test_concurrent_queries_from_threads(index):
    _fill(index, 20)
    index.rebuild()
    texts, labels = _target()
    x = index.embed(texts)
    expected = index.rank_embeddings(x, labels, top=5).results
    errors, results = [], []

    def work():
        try:
            results.append(index.rank_embeddings(x, labels, top=5).results)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and all(r == expected for r in results)


IMPORTER = """
import sys, time, numpy as np
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from conftest import random_esms
from esm_index.index import SourceIndex
index = SourceIndex({folder!r})
esms = random_esms(np.random.default_rng(7), 400, 32)
def items():
    for i, e in enumerate(esms):
        if i == 8:
            print("started", flush=True)
        if "slow" in sys.argv:
            time.sleep(0.01)  # a slow source of ESMs, so the kill lands mid-way
        yield f"k{{i}}", e
index.add_esms(items(), batch_size=8)
print("finished", flush=True)
"""


def test_killed_import_loses_nothing_committed_and_resumes(index):
    script = IMPORTER.format(repo=str(REPO), tests=str(REPO / "tests"), folder=str(index.folder))
    proc = subprocess.Popen([sys.executable, "-c", script, "slow"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    # Let some batches commit while queries keep answering beside the writer.
    reader = SourceIndex(index.folder, readonly=True)
    texts, labels = _target(60)
    x = index.embed(texts)
    seen = []
    for _ in range(3):
        ranking = reader.rank_embeddings(x, labels, top=3)
        seen.append(ranking.pool_size)
        # each query sees whole committed batches and ranks the sources it sees
        assert ranking.pool_size % 8 == 0 and len(ranking.results) == min(3, ranking.pool_size)
        assert all(r.source.startswith("k") for r in ranking.results)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(SourceIndex(index.folder))
    assert 0 < partial < 400 and partial % 8 == 0  # whole batches only
    assert seen == sorted(seen) and seen[-1] <= partial  # commits only ever add
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "finished" in proc.stdout, proc.stderr
    resumed = SourceIndex(index.folder)
    assert len(resumed) == 400
    assert sorted(s["name"] for s in resumed.sources()) == sorted(f"k{i}" for i in range(400))
    resumed.rebuild()
    assert resumed.verify() == []


def test_small_and_large_targets_get_their_plans(index):
    """Up to 20k sources the prefilter passes 512 sources on from the FAISS stage and 128 from
    the approximate stage (prefilter.plan, BENCHMARKS.md §6). A target with more examples
    than the maps have dimensions (80 > 32 here) is seen through the pool's mean map
    (summary.Pooled): its refining scores are those of that view, a smaller one's are not."""
    from esm_index import query
    from esm_index.logme import TargetStats
    from esm_index.results import Query
    from esm_index.summary import TargetView, refining_scores

    _fill(index, 600)
    index.rebuild()
    texts, labels = _target(80)
    x = index.embed(texts)
    prefilter = index.prefilter()
    for n, pooled in ((24, False), (80, True)):  # the tiny model's maps have 32 dimensions
        scored = query.score(index, x[:n], labels[:n], "classification", Query(top=5, method="esm-logme"))
        stages = scored.found.stage_scores
        assert (len(stages["faiss"]), len(stages["approximate"]), len(stages["refining"]),
                len(scored.logme)) == (512, 128, 32, 32)
        view = TargetView(TargetStats.from_embeddings(x[:n], labels[:n]), pool=(index.probe, prefilter.mean))
        assert (view.pooled(64, 32) is not None) == pooled
        ids = np.asarray(list(stages["refining"]))
        _, w, b = index.store.esms(ids)
        np.testing.assert_allclose(refining_scores(view, w, b, 64), [stages["refining"][i] for i in ids], atol=1e-9)


def test_a_prefiltered_ranking_of_a_large_target_says_so(index):
    """Past 150 examples the prefilter lost exact top-5s on a 10k pool of strongly
    fine-tuned maps (BENCHMARKS.md §6): such a ranking warns and points to --exact; an exact
    one, or a smaller target's, does not."""
    _fill(index, 40)  # more than the 32-source shortlist: the prefilter chooses
    index.rebuild()
    texts, labels = _target(160)
    x = index.embed(texts)

    def warned(n, **options):
        ranking = index.rank_embeddings(x[:n], labels[:n], top=3, method="esm-logme", **options)
        return any("--exact" in w for w in ranking.warnings)

    assert warned(160) and not warned(150) and not warned(160, exact=True)


def test_a_prefiltered_ranking_from_a_pool_past_20k_sources_says_so():
    """On 100k strongly fine-tuned maps the prefilter lost a third of 150-example targets'
    top-5s (BENCHMARKS.md §6): a prefiltered ranking from a pool (or shard) past 20k sources
    warns whatever the target's size. (Checked on the function: a 20k-source test pool
    would take minutes.)"""
    from esm_index.query import prefilter_warning

    assert prefilter_warning(100, True, 20_001) and not prefilter_warning(100, True, 20_000)
    assert not prefilter_warning(100, False, 100_000) and prefilter_warning(151, True, 40)
