"""Domain similarity and the combined ranking (domain.py), over a real LMDB store and real
FAISS files with the tiny in-process BERT, through the API and the CLI."""

import numpy as np
import pytest

from conftest import cli_json, one_line_error, random_esms, read_sample
from esm_index.domain import DOMAIN_KEY, DOMAIN_WEIGHT, DomainSearch, combine, similarities, standardise
from esm_index.errors import InvalidArgumentError
from esm_index.index import SourceIndex
from esm_index.prefilter import DOMAIN_FILE


def test_combined_orders_by_the_standardised_sum_in_logme_units():
    rng = np.random.default_rng(0)
    logme, domain = rng.normal(0.3, 0.1, 50), rng.uniform(0, 1, 50)
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    combined = combine(logme, domain, "combined")
    np.testing.assert_array_equal(np.argsort(combined), np.argsort(z(logme) + DOMAIN_WEIGHT * z(domain)))
    np.testing.assert_allclose(combined - logme, DOMAIN_WEIGHT * logme.std() * z(domain))
    np.testing.assert_array_equal(combine(logme, domain, "esm-logme"), logme)
    np.testing.assert_array_equal(combine(logme, domain, "domain"), domain)
    # no domain vector: neutral in "combined" (no bonus), last in "domain"
    domain[[3, 7]] = np.nan
    assert standardise(domain)[3] == 0 and combine(logme, domain, "combined")[3] == logme[3]
    assert set(np.argsort(combine(logme, domain, "domain"))[:2]) == {3, 7}
    assert np.array_equal(combine(logme, np.full(50, np.nan), "combined"), logme)
    with pytest.raises(ValueError):
        combine(logme, domain, "bogus")


def test_similarities_are_cosines_of_mean_embeddings():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8))
    vecs = rng.standard_normal((3, 8))
    metas = [{DOMAIN_KEY: vecs[0].tolist()}, {}, {DOMAIN_KEY: vecs[2].tolist()}, {DOMAIN_KEY: [1.0, 2.0]}]
    got = similarities(x, metas)
    m = x.mean(0)
    cos = lambda a: a @ m / np.linalg.norm(a) / np.linalg.norm(m)  # noqa: E731
    assert got[0] == pytest.approx(cos(vecs[0])) and got[2] == pytest.approx(cos(vecs[2]))
    assert np.isnan(got[1]) and np.isnan(got[3])  # none, or one of another model's width


def test_domain_search_finds_the_nearest_within_the_allowed_ids():
    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    ids = np.arange(300, dtype=np.int64) * 7 + 5
    search = DomainSearch.build(16, [(ids[:200], vecs[:200]), (ids[200:], vecs[200:])])
    target = vecs[42] + 0.01 * rng.standard_normal((10, 16))  # texts whose mean is source 42's domain
    truth = np.argsort(-(vecs / np.linalg.norm(vecs, axis=1, keepdims=True)) @ target.mean(0))
    np.testing.assert_array_equal(search.search(target, 10), ids[truth[:10]])
    allowed = ids[truth[5:40]]
    np.testing.assert_array_equal(search.search(target, 3, allowed), ids[truth[5:8]])
    assert len(search.search(target, 0)) == 0


def _target():
    texts, names = read_sample("movie_reviews", 120)
    return texts, np.asarray([x == "fresh" for x in names], int)


@pytest.fixture
def pool(tmp_path, tiny_model):
    """40 random sources, each with a random domain vector, except ``near``, whose domain is
    the target's own (its texts' mean embedding), and ``plain``, which has none."""
    texts, labels = _target()
    with SourceIndex.create(tmp_path / "idx", tiny_model) as index:
        rng = np.random.default_rng(3)
        own = index.embed(texts).mean(0)
        items = []
        for i, esm in enumerate(random_esms(rng, 40, 32, scale=1.0)):
            esm.meta[DOMAIN_KEY] = (own if i == 17 else rng.standard_normal(32)).tolist()
            items.append((f"s{i}", esm))
        items[17] = ("near", items[17][1])
        items[18][1].meta.pop(DOMAIN_KEY)
        items[18] = ("plain", items[18][1])
        index.add_esms(items)
        index.rebuild()
        yield index


def test_the_methods_rank_one_scored_set_three_ways(pool):
    texts, labels = _target()
    by = {m: pool.rank(texts, labels, top=40, exact=True, method=m) for m in ("combined", "esm-logme", "domain")}
    logme = {r.source: r.esm_logme for r in by["esm-logme"].results}
    assert all(r.score == r.esm_logme for r in by["esm-logme"].results)
    assert [r.source for r in by["esm-logme"].results] == sorted(logme, key=lambda s: -logme[s])
    assert by["domain"].results[0].source == "near" and by["domain"].results[-1].source == "plain"
    assert by["domain"].results[0].domain_similarity == pytest.approx(1.0, abs=1e-5)
    combined = by["combined"].results
    assert combined[0].source == "near" and by["combined"].method == "combined"
    assert {r.source: r.esm_logme for r in combined} == pytest.approx(logme)  # the same exact scores
    plain = next(r for r in combined if r.source == "plain")
    assert plain.domain_similarity is None and plain.score == plain.esm_logme  # no bonus, no malus
    assert DOMAIN_KEY not in combined[0].meta
    with pytest.raises(InvalidArgumentError, match="ranking method"):
        pool.rank(texts, labels, method="bogus")


def test_the_prefilter_path_scores_the_nearest_domains_too(pool):
    """With a shortlist of 3 out of 40, the source of the target's own domain is scored (and
    ranked first by "combined") though the ESM stages alone do not pass it on."""
    texts, labels = _target()
    exact = pool.rank(texts, labels, top=40, exact=True, method="combined")
    fast = pool.rank(texts, labels, top=3, shortlist=3, candidates=8, refine=4, method="combined")
    assert fast.results[0].source == "near" == exact.results[0].source
    alone = pool.rank(texts, labels, top=3, shortlist=3, candidates=8, refine=4, method="esm-logme")
    assert "near" not in {r.source for r in alone.results}  # the ESM stages' shortlist of 3 lacks it


def test_the_domain_file_is_derived_and_checked(pool):
    assert (pool.folder / DOMAIN_FILE).is_file() and pool.verify() == []
    assert len(pool.prefilter().domain) == 39  # "plain" has no vector
    (pool.folder / DOMAIN_FILE).write_bytes(b"damaged")
    reader = SourceIndex(pool.folder, readonly=True)
    assert any("prefilter files" in p for p in reader.verify())
    texts, labels = _target()
    assert reader.rank(texts, labels, top=1, shortlist=3).results[0].source == "near"  # rebuilt in memory
    pool.rebuild()
    assert pool.verify() == []


def test_esms_made_from_models_carry_their_texts_domain(tiny_model):
    from esm_index.embed import Embedder
    from esm_index.finetune import esm_from_models

    embedder = Embedder(tiny_model)
    texts = read_sample("movie_reviews", 60)[0]
    esm = esm_from_models(embedder, embedder.model, texts)
    np.testing.assert_allclose(esm.meta[DOMAIN_KEY], embedder.embed(texts).mean(0), atol=1e-6)


def test_cli_method_option_and_columns(runner, tmp_path, pool):
    from esm_index.cli import main

    target = tmp_path / "t.csv"
    texts, labels = _target()
    import csv

    with target.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    base = ["rank", str(target), "--index", str(pool.folder), "--text-col", "text", "--label-col", "label"]
    data = cli_json(runner.invoke(main, [*base, "--json", "--method", "domain", "--top", "3"]))
    assert data["method"] == "domain" and data["results"][0]["source"] == "near"
    assert {"esm_logme", "domain_similarity"} <= set(data["results"][0])
    table = runner.invoke(main, [*base, "--top", "3"])
    assert "ranked by ESM-LogME + domain similarity" in table.output and "near" in table.output.splitlines()[2]
    header = runner.invoke(main, [*base, "--csv", "--top", "2"]).stdout.splitlines()[0]
    assert header.startswith("rank,source,score,esm_logme,domain_similarity,")
    assert "bogus" in one_line_error(runner.invoke(main, [*base, "--method", "bogus"]))


def test_maps_are_fitted_on_other_texts_too_but_the_domain_is_the_sources(tiny_model):
    from esm_index.embed import Embedder
    from esm_index.finetune import esm_from_models

    embedder = Embedder(tiny_model)
    texts = read_sample("movie_reviews", 60)[0]
    other = read_sample("sms_spam", 40)[0]
    esm = esm_from_models(embedder, embedder.model, texts, other_texts=other)
    assert esm.meta["fit_texts"] == {"source": 60, "other": 40}
    np.testing.assert_allclose(esm.meta[DOMAIN_KEY], embedder.embed(texts).mean(0), atol=1e-6)
    # the same encoder on both sides: the map is the identity, whatever it was fitted on
    np.testing.assert_allclose(esm.apply(embedder.embed(other)), embedder.embed(other), atol=1e-3)
