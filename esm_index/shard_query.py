"""A query over shards: what one shard computes and sends back, and the exact merge.

Each shard runs the query path up to and including the exact rerank (``query.score``: its
own prefilter, shortlist and nearest domains) and sends back ESM-LogME and domain similarity
of every source it scored exactly (16 bytes a source: "combined" standardises them over the
union of all shards, as it does over one index), and names, stage scores and metadata only
for the sources that can still make the query's top whatever the other shards scored
(``contenders``). The driver orders the union with query.py's own ``combine`` and
``results``, so the merge is exact, and an exact scan of a large shard sends back kilobytes
of metadata, not a record per source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import query as query_path
from .domain import DOMAIN_KEY
from .errors import IndexStoreError
from .logme import one_blas_thread
from .results import Query, Ranking


@dataclass
class ShardScores:
    """What one shard sends back for a query: ESM-LogME and domain similarity (NaN: none) of
    every source it scored exactly, and for the ``contenders`` among them (positions into
    those arrays) their names, stage scores (NaN: not scored by that stage) and metadata
    (without the domain vector). Plain arrays and JSON values, cheap to send."""

    logme: np.ndarray
    domain: np.ndarray
    contenders: np.ndarray
    names: list[str]
    stages: dict[str, np.ndarray]
    metas: list[dict]
    pool_size: int
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "ShardScores":
        return cls(np.zeros(0), np.zeros(0), np.zeros(0, np.int64), [], {s: np.zeros(0) for s in query_path.STAGES},
                   [], 0)


def score_shard(index, x: np.ndarray, labels: np.ndarray, task: str, query: Query) -> ShardScores:
    """Run the query on one shard up to the exact rerank (``query.score``). A shard without
    a source the filters accept sends nothing back (the driver checks the whole pool)."""
    filters = query.filters
    if not len(index) or (filters and not any(filters.accepts(m) for _, m in index.store.iter_meta())):
        return ShardScores.empty()
    with one_blas_thread():
        scored = query_path.score(index, x, labels, task, query)
    logme = np.asarray(scored.logme, np.float64)
    keep = contenders(logme, scored.domain, query.method, query.top)
    ids = scored.found.ids[keep]
    stages = {s: np.asarray([scored.found.stage_scores[s].get(int(i), np.nan) for i in ids], np.float64)
              for s in query_path.STAGES}
    metas = [{k: v for k, v in m.items() if k != DOMAIN_KEY} for m in index.store.metas(ids)]
    return ShardScores(logme, scored.domain, keep, [m["name"] for m in metas], stages, metas,
                       scored.pool_size, scored.timings)


def contenders(logme: np.ndarray, domain: np.ndarray, method: str, top: int) -> np.ndarray:
    """Positions of the sources that can be among the ``top`` of the union for ``method``,
    whatever the other shards scored: those fewer than ``top`` sources of this shard beat
    under every possible union.

    "esm-logme" orders by ESM-LogME, "domain" by domain similarity (none: last). "combined"
    orders by logme + rho * domain + c, where rho >= 0 and c depend on the whole union (the
    spreads that standardise them, domain.combine); a source that ``top`` others exceed in
    both is behind them for every rho, so only the rest can contend. A source without a
    domain vector scores logme + c' (its z-score is 0); among those, ESM-LogME decides."""
    if method == "esm-logme":
        return np.flatnonzero(_fewer_above(logme, top))
    has = np.isfinite(domain)
    if method == "domain":  # without a vector: behind every source with one, then by ESM-LogME
        return np.flatnonzero(np.where(has, _fewer_above(np.where(has, domain, -np.inf), top),
                                       _fewer_above(np.where(has, np.inf, logme), top)))
    keep = np.zeros(len(logme), bool)
    keep[has] = _undominated(logme[has], domain[has], top)
    keep[~has] = _fewer_above(logme[~has], top)
    return np.flatnonzero(keep)


def _fewer_above(v: np.ndarray, k: int) -> np.ndarray:
    """True where fewer than ``k`` entries are strictly greater (ties at the k-th kept)."""
    if len(v) <= k:
        return np.ones(len(v), bool)
    return v >= np.partition(v, len(v) - k)[len(v) - k]


def _undominated(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """True where fewer than ``k`` entries j have a_j > a_i and b_j > b_i.

    By a falling: ``best`` holds the k largest b among the entries of strictly greater a, so
    entry i is dominated k times exactly when b_i < best's smallest (``bar``), which only
    rises. A run of dominated entries is skipped at once (numpy), so the loop turns once per
    group of equal a holding a contender: a few times ``k``, whatever the number of entries."""
    order = np.argsort(-a, kind="stable")
    sa, sb = a[order], b[order]
    keep = np.zeros(len(a), bool)
    best: list[float] = []
    i = 0
    while i < len(order):
        bar = best[0] if len(best) == k else -np.inf
        if bar > -np.inf:  # jump to the next entry at or above the bar
            ahead = np.flatnonzero(sb[i:] >= bar)
            if not len(ahead):
                break
            i += int(ahead[0])
        end = i + int(np.searchsorted(-sa[i:], -sa[i], side="right"))  # the group of equal a
        group = sb[i:end] >= bar
        keep[order[i:end][group]] = True
        best = sorted(best + sb[i:end][group].tolist())[-k:]
        i = end
    return keep


def merge(parts: Sequence[ShardScores], query: Query, about: dict, warnings: list[str]) -> Ranking:
    """One ranking from the shards' scores, ordered over their union by the query's method
    with query.py's own ``combine`` and ``results`` (the sources numbered by their place
    in the union)."""
    names = [n for p in parts for n in p.names]  # the contenders' ('esm-index verify' checks them all)
    if len(set(names)) != len(names):
        raise IndexStoreError("a source name is in two shards; 'esm-index verify' on the sharded index lists it")
    logme = np.concatenate([p.logme for p in parts])
    domain = np.concatenate([p.domain for p in parts])
    starts = np.cumsum([0] + [len(p.logme) for p in parts])[:-1]
    places = np.concatenate([p.contenders + start for p, start in zip(parts, starts)]).astype(np.int64)
    found = query_path.Shortlist(np.arange(len(logme), dtype=np.int64))
    for stage in query_path.STAGES:
        values = np.concatenate([p.stages[stage] for p in parts])
        has = np.isfinite(values)
        found.record(stage, places[has], values[has])
    method, scores = query_path.combine(logme, domain, query.method)
    order = query_path.top_order(scores, logme, query.top)
    meta_at = dict(zip(places.tolist(), (m for p in parts for m in p.metas)))
    if not all(int(j) in meta_at for j in order):  # contenders() is exact: this is a bug if it happens
        raise IndexStoreError("a shard left out a source that ranks in the top; please report this")
    results = query_path.results(found, order, [meta_at[int(j)] for j in order], scores, logme, domain)
    return Ranking(results, pool_size=sum(p.pool_size for p in parts), target=about, warnings=warnings,
                   method=method)
