"""A pool split into shards (shards.py), queried in-process and by real local Ray actors
(ray_shards.py), against the same pool unsharded: real LMDB, real FAISS, a real Ray instance
(one per test session, two CPUs), the tiny in-process BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SAMPLES, cli_json, one_line_error, random_esms
from esm_index.cli import main
from esm_index.domain import DOMAIN_KEY
from esm_index.errors import IndexStoreError, InvalidArgumentError, ModelMismatchError, NoSourcesError
from esm_index.index import SourceIndex
from esm_index.results import METHODS, Filters
from esm_index.shards import MANIFEST, ShardedIndex, open_index, shard_of

POOL = 24  # no larger than the default shortlist (32): the default query scores every source
SHARDS = 4


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (start-up costs seconds); the Ray tests
    skip only where Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _esms(count: int, seed: int, dim: int = 32):
    """Maps with domain vectors and metadata, so that every method has something to order."""
    rng = np.random.default_rng(seed)
    out = []
    for i, esm in enumerate(random_esms(rng, count, dim, scale=1.0)):
        esm.meta.update({"task_id": f"p{seed}-{i}", "language": "en" if i % 2 else "de", "num_examples": 50 * i,
                         DOMAIN_KEY: rng.standard_normal(dim).round(6).tolist()})
        if i:  # build_pool's record of a 30-step budget, which the 10-pass cap lowers to 20 for 50 rows
            esm.meta["finetune"] = {"steps": min(30, 10 * -(-50 * i // 32)), "max_passes": 10, "batch_size": 32,
                                    "lr": 5e-5, "weight_decay": 0.01, "max_length": 64}
        out.append((f"p{seed}-{i}", esm))
    return out


def _target(n: int = 120, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 32)).astype(np.float32), np.arange(n) % 3


@pytest.fixture(scope="module")
def pools(tmp_path_factory, tiny_model):
    """(unsharded folder, the same pool split into 4 shards)."""
    root = tmp_path_factory.mktemp("pools")
    with SourceIndex.create(root / "whole", tiny_model) as whole:
        whole.add_esms(_esms(POOL, 0))
        whole.rebuild()
    ShardedIndex.split(root / "whole", root / "sharded", SHARDS).close()
    return root / "whole", root / "sharded"


@pytest.fixture(scope="module")
def ray_sharded(pools, ray_cluster):
    """The sharded pool behind one Ray actor per shard, started once for the module."""
    with ShardedIndex(pools[1], readonly=True, workers=SHARDS) as index:
        yield index


def _pairs(ranking):
    return [(r.source, r.score, r.esm_logme, r.domain_similarity) for r in ranking.results]


def _assert_same(sharded, whole, bitwise: bool = True):
    """Same sources in the same order and the same scores. ESM-LogME and domain similarity
    bit for bit when the shards ran in this process (``bitwise``); a Ray actor runs its
    kernels on its own share of the cores, which can change the last bit of a sum. The
    ranking score to the last few bits: the mean and spread of "combined" are summed in
    another order over the union."""
    assert [r.source for r in sharded.results] == [r.source for r in whole.results]
    close = (lambda a, b: a == b) if bitwise else (lambda a, b: a == pytest.approx(b, rel=1e-13, abs=1e-13))
    for a, b in zip(sharded.results, whole.results):
        assert close(a.esm_logme, b.esm_logme) and close(a.domain_similarity, b.domain_similarity)
        assert a.score == pytest.approx(b.score, rel=1e-12, abs=1e-12)
        assert a.meta == b.meta
    assert sharded.pool_size == whole.pool_size and sharded.method == whole.method


def test_split_puts_each_source_in_its_shard(pools):
    whole_dir, sharded_dir = pools
    with SourceIndex(whole_dir, readonly=True) as whole, ShardedIndex(sharded_dir, readonly=True) as sharded:
        assert len(sharded) == len(whole) == POOL and sharded.verify() == []
        names = {s["name"] for s in whole.sources()}
        placed = {}
        for i, shard in enumerate(sharded.shards):
            for s in shard.sources():
                placed[s["name"]] = i
        assert set(placed) == names and all(shard_of(n, SHARDS) == i for n, i in placed.items())
        assert len(set(placed.values())) == SHARDS  # 24 names over 4 shards: none is empty
        assert sharded.get_esm("p0-3").weight.tolist() == whole.get_esm("p0-3").weight.tolist()
        assert sharded.info()["sources"] == POOL and sum(sharded.info()["shards"].values()) == POOL


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("exact", [True, False])
def test_sharded_in_process_equals_unsharded(pools, method, exact):
    x, y = _target()
    with SourceIndex(pools[0], readonly=True) as whole, ShardedIndex(pools[1], readonly=True) as sharded:
        assert sharded.workers == 0
        expected = whole.rank_embeddings(x, y, top=10, exact=exact, method=method)
        _assert_same(sharded.rank_embeddings(x, y, top=10, exact=exact, method=method), expected)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_on_ray_equals_unsharded(pools, ray_sharded, method):
    x, y = _target(seed=2)
    with SourceIndex(pools[0], readonly=True) as whole:
        for exact in (True, False):
            expected = whole.rank_embeddings(x, y, top=10, exact=exact, method=method)
            _assert_same(ray_sharded.rank_embeddings(x, y, top=10, exact=exact, method=method), expected, False)
    assert len(ray_sharded._actors.actors) == SHARDS


def test_filters_and_the_prefilter_on_each_shard(pools, ray_sharded):
    """Filters apply in every shard. With shortlists shorter than a shard, each shard runs
    its own prefilter: every source returned still carries its exact score and the stage
    scores it got, and the union is what the driver orders."""
    x, y = _target(seed=3)
    with SourceIndex(pools[0], readonly=True) as whole:
        exact = {r.source: r.esm_logme for r in whole.rank_embeddings(x, y, top=POOL, exact=True).results}
        german = Filters(language="de")
        _assert_same(ray_sharded.rank_embeddings(x, y, top=5, filters=german, method="esm-logme"),
                     whole.rank_embeddings(x, y, top=5, filters=german, method="esm-logme"), False)
    with pytest.raises(NoSourcesError):
        ray_sharded.rank_embeddings(x, y, top=5, filters=Filters(language="xx"))
    short = ray_sharded.rank_embeddings(x, y, top=4, shortlist=4, candidates=5, refine=5, method="esm-logme")
    assert short.pool_size == POOL and len(short.results) == 4
    assert all(r.esm_logme == pytest.approx(exact[r.source], rel=1e-13) for r in short.results)
    assert any(r.approximate_score is not None for r in short.results)
    logme = [r.esm_logme for r in short.results]
    assert logme == sorted(logme, reverse=True)


def test_adding_goes_to_one_shard_and_every_query_sees_it(tmp_path, pools, ray_cluster):
    folder = tmp_path / "sharded"
    ShardedIndex.split(pools[0], folder, 3).close()
    x, y = _target(seed=4)
    with ShardedIndex(folder) as index, ShardedIndex(folder, readonly=True, workers=1) as on_ray:
        before = on_ray.rank_embeddings(x, y, top=POOL + 2, exact=True)  # the actors are up before the add
        new = _esms(2, 7)
        assert index.add_esms(new) == (2, 0) and index.add_esms(new[:1]) == (0, 1)  # a name is added once
        index.rebuild()
        for name, _ in new:
            holders = [i for i, s in enumerate(index.shards) if s.store.id_of(name) is not None]
            assert holders == [shard_of(name, 3)]
        assert len(index) == POOL + 2 and index.verify() == []
        for ranked in (index, on_ray):
            after = ranked.rank_embeddings(x, y, top=POOL + 2, exact=True)
            assert after.pool_size == POOL + 2 and {r.source for r in after.results} == \
                {r.source for r in before.results} | {n for n, _ in new}
        assert index.remove(["p7-0", "nowhere"]) == ["nowhere"] and len(index) == POOL + 1


def test_mismatched_or_broken_shards_are_refused(tmp_path, tiny_model, pools):
    from esm_index.embed import EmbeddingSpec

    SourceIndex.create(tmp_path / "a", tiny_model).close()
    SourceIndex.create(tmp_path / "b", tiny_model, spec=EmbeddingSpec(model_name="tiny", pooling="cls")).close()
    manifest = {"format": "esm-index shards", "version": 1, "shards": ["a", "b"]}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="every shard must share"):
        ShardedIndex(tmp_path)
    for shards, error in ((["a", "missing"], IndexStoreError), ([str(tmp_path / "a")], IndexStoreError),
                          ([], IndexStoreError)):
        (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "shards": shards}))
        with pytest.raises(error):
            ShardedIndex(tmp_path)
    with pytest.raises(InvalidArgumentError):
        ShardedIndex.split(pools[0], tmp_path / "a", 2)  # not an empty folder
    with pytest.raises(InvalidArgumentError):
        open_index(pools[0], workers=2)  # a plain index has no shards to spread


def test_cli_shard_then_rank_info_list_verify(runner, pools, tmp_path, ray_cluster):
    out = tmp_path / "cli_shards"
    result = runner.invoke(main, ["shard", str(pools[0]), str(out), "--shards", "4"])
    assert result.exit_code == 0 and "split 24 sources into 4 shards" in result.output, result.output
    target = ["rank", str(SAMPLES / "sms_spam.csv"), "--text-col", "text", "--label-col", "label", "--top", "10",
              "--json", "--exact"]
    whole = cli_json(runner.invoke(main, [*target, "--index", str(pools[0])]))
    for extra in ([], ["--workers", "1"]):
        sharded = cli_json(runner.invoke(main, [*target, "--index", str(out), *extra]))
        assert [(r["source"], r["esm_logme"]) for r in sharded["results"]] == \
            [(r["source"], r["esm_logme"]) for r in whole["results"]]
        assert sharded["pool_size"] == 24 and "shards" in sharded["timings"]
    info = cli_json(runner.invoke(main, ["info", str(out), "--json"]))
    assert info["sources"] == 24 and len(info["shards"]) == 4
    assert info["recipe"].startswith("30 steps of 32") and \
        info["recipe"] == cli_json(runner.invoke(main, ["info", str(pools[0]), "--json"]))["recipe"]
    assert runner.invoke(main, ["info", str(out)]).exit_code == 0
    assert len(cli_json(runner.invoke(main, ["list", str(out), "--json"]))) == 24
    assert "ok: 24 sources" in runner.invoke(main, ["verify", str(out)]).output
    one_line_error(runner.invoke(main, ["shard", str(pools[0]), str(out)]))  # OUT not empty
    one_line_error(runner.invoke(main, [*target, "--index", str(pools[0]), "--workers", "2"]))  # not sharded


def test_a_failing_shard_worker_is_one_typed_error(ray_cluster, tmp_path):
    """An actor that cannot open its shard (here: no index there) fails the query with one
    line, not Ray's remote traceback."""
    from esm_index.ray_shards import RayShards

    with pytest.raises(IndexStoreError, match="nowhere: not an esm-index index") as failure:
        RayShards([str(tmp_path / "nowhere")], 1)
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("method", METHODS)
def test_a_shard_sends_every_source_that_can_make_the_top(method):
    """``contenders`` against brute force: this shard's sources, merged with random other
    shards (other spreads, so other standardisations; ties; sources without a domain vector,
    in either place), never put a source in the top that the shard left out."""
    from esm_index import query as query_path
    from esm_index.shard_query import contenders

    rng = np.random.default_rng(METHODS.index(method))
    pruned = 0
    for _ in range(400):
        n, k, m = int(rng.integers(1, 30)), int(rng.integers(1, 7)), int(rng.integers(0, 30))
        mine = np.stack([rng.integers(0, 5, n).astype(float), rng.standard_normal(n)])[rng.permutation(2)]
        mine[1, rng.random(n) < 0.2] = np.nan  # rows: ESM-LogME, domain (either may have ties)
        other = rng.standard_normal((2, m)) * rng.uniform(0.1, 3, (2, 1)) + rng.uniform(-2, 2, (2, 1))
        other[1, rng.random(m) < rng.uniform(0, 0.5)] = np.nan
        kept = set(contenders(mine[0], mine[1], method, k).tolist())
        for first in (True, False):
            logme, domain = np.concatenate([mine, other] if first else [other, mine], axis=1)
            if method == "domain" and not np.isfinite(domain).any():
                continue
            _, scores = query_path.combine(logme, domain, method)
            start = 0 if first else m
            top = [j - start for j in query_path.top_order(scores, logme, k) if start <= j < start + n]
            assert set(top) <= kept
        pruned += len(kept) < n
    assert pruned > 100  # a filter, not everything
