"""A query over shards: what one shard computes and sends back, and the exact merge.

Each shard runs the query path up to and including the exact rerank (``query.score``: its
own prefilter, shortlist and nearest domains) and sends back, per source it scored exactly,
(name, ESM-LogME, domain similarity, stage scores, metadata): plain arrays and JSON values,
cheap to send from a Ray actor (ray_shards.py). The driver orders the union with query.py's
own ``combine`` and ``results``, so "combined" standardises ESM-LogME and domain similarity
over every source scored in every shard, as it does over one index.
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
    """What one shard sends back for a query: per source scored exactly, its name, ESM-LogME,
    domain similarity (NaN: none), stage scores (NaN: not scored by that stage) and metadata
    (without the domain vector). Plain arrays and JSON values, cheap to send."""

    names: list[str]
    logme: np.ndarray
    domain: np.ndarray
    stages: dict[str, np.ndarray]
    metas: list[dict]
    pool_size: int
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "ShardScores":
        return cls([], np.zeros(0), np.zeros(0), {s: np.zeros(0) for s in query_path.STAGES}, [], 0)


def score_shard(index, x: np.ndarray, labels: np.ndarray, task: str, query: Query) -> ShardScores:
    """Run the query on one shard up to the exact rerank (``query.score``). A shard without
    a source the filters accept sends nothing back (the driver checks the whole pool)."""
    filters = query.filters
    if not len(index) or (filters and not any(filters.accepts(m) for _, m in index.store.iter_meta())):
        return ShardScores.empty()
    with one_blas_thread():
        scored = query_path.score(index, x, labels, task, query)
    ids = scored.found.ids.tolist()
    stages = {s: np.asarray([scored.found.stage_scores[s].get(i, np.nan) for i in ids], np.float64)
              for s in query_path.STAGES}
    metas = [{k: v for k, v in m.items() if k != DOMAIN_KEY} for m in index.store.metas(scored.found.ids)]
    return ShardScores([m["name"] for m in metas], np.asarray(scored.logme, np.float64), scored.domain, stages,
                       metas, scored.pool_size, scored.timings)


def merge(parts: Sequence[ShardScores], query: Query, about: dict, warnings: list[str]) -> Ranking:
    """One ranking from the shards' scores, ordered over their union by the query's method
    with query.py's own ``combine`` and ``results`` (the sources numbered by their place
    in the union)."""
    names = [n for p in parts for n in p.names]
    if len(set(names)) != len(names):
        raise IndexStoreError("a source name is in two shards; 'esm-index verify' on the sharded index lists it")
    logme = np.concatenate([p.logme for p in parts])
    domain = np.concatenate([p.domain for p in parts])
    found = query_path.Shortlist(np.arange(len(names), dtype=np.int64))
    for stage in query_path.STAGES:
        values = np.concatenate([p.stages[stage] for p in parts])
        has = np.isfinite(values)
        found.record(stage, found.ids[has], values[has])
    method, scores = query_path.combine(logme, domain, query.method)
    metas = [m for p in parts for m in p.metas]
    order = query_path.top_order(scores, logme, query.top)
    results = query_path.results(found, order, [metas[j] for j in order], scores, logme, domain)
    return Ranking(results, pool_size=sum(p.pool_size for p in parts), target=about, warnings=warnings,
                   method=method)
