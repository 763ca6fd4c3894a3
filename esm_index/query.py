"""The query path, one named step per stage (``SourceIndex.rank_embeddings`` runs ``run``; a
sharded index runs ``score``, every step before ``combine``, on each shard, shard_query.py):

    check_input -> target_statistics -> allowed_ids
        -> faiss_stage -> approximate_stage -> refining_stage -> nearest_domains   (the prefilter)
        -> exact_stage -> combine -> results

The prefilter's stages (results.py names them; prefilter.py and summary.py explain them) run
only when the pool is larger than the shortlist: each passes the best of its sources on to
the next, and every stage score a source got is reported under its stage's name. The exact
stage is ESM-LogME (logme.py); ``combine`` orders by the query's method (domain.py).

An exact query (``--exact``, or a shortlist that covers the pool) is ``scan_stage`` instead:
the pool streams from the store in batches (store.SCAN_BATCH), and only each source's id,
ESM-LogME and domain similarity are kept (24 bytes a source), since "combined" standardises
over every source scored; the metadata is read for the ``top`` results alone. Memory is one
batch of maps whatever the pool's size, and the scores are those of one batch: each source
is scored on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .checks import check_labels, check_method, check_size, check_stages
from .domain import DOMAIN_KEY, combine as combine_scores, similarities
from .embed import best_device
from .errors import ModelMismatchError, NoSourcesError
from .logme import TargetStats, one_blas_thread, score_esms
from .prefilter import LARGE_POOL, Prefilter, plan
from .results import Filters, Query, Ranking, Result
from .summary import TargetView, approximate_scores, refining_scores

HIDDEN_META = ("name", "fit", "finetune", "embedding", DOMAIN_KEY)  # kept in the store, not in results
STAGES = ("faiss", "approximate", "refining")  # the prefilter's stages, in order
# Targets of up to this many examples kept their whole exact top-5 through the prefilter on a
# 10k pool of strongly fine-tuned maps; larger ones lost much of it (BENCHMARKS.md section 6)
PREFILTER_MEASURED_UP_TO = 150


def prefilter_warning(n: int, prefiltered: bool, pool_size: int = 0) -> list[str]:
    """The warning a ranking carries when the prefilter chose its shortlist for a target
    larger than it was found reliable for, or in a pool past 20k sources (on 100k strongly
    fine-tuned maps it lost a third of 150-example targets' top-5s); --exact scores every
    source instead."""
    if not prefiltered or (n <= PREFILTER_MEASURED_UP_TO and pool_size <= LARGE_POOL):
        return []
    return [f"the prefilter chose which sources were scored exactly, and it can miss the best ones for "
            f"targets of more than {PREFILTER_MEASURED_UP_TO} examples or pools of more than {LARGE_POOL:,} "
            f"sources (on test pools of strongly fine-tuned maps it kept 83 % of the exact top-5 at 300 "
            f"examples and 63 % at 500 among 10,000 sources, 65 % at 150 examples among 100,000; "
            f"BENCHMARKS.md §6): --exact scores every source"]


class Timer:
    """Seconds per step, in the order the steps ran: ``lap(name)`` closes the step ``name``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 4)
        self._clock = now

    def add(self, seconds: dict[str, float]) -> None:
        """Steps that ran interleaved (reading and scoring batches), timed by the caller."""
        self.timings.update({name: round(v, 4) for name, v in seconds.items()})
        self._clock = time.perf_counter()


@dataclass
class Shortlist:
    """The sources still in the running (ids, and their maps once loaded) and the score each
    prefilter stage gave them, by stage name then source id."""

    ids: np.ndarray
    weights: np.ndarray | None = None  # (B, D, d) float32
    biases: np.ndarray | None = None  # (B, D) float32
    stage_scores: dict[str, dict[int, float]] = field(default_factory=lambda: {s: {} for s in STAGES})

    def record(self, stage: str, ids: np.ndarray, scores: np.ndarray) -> None:
        self.stage_scores[stage].update(zip(ids.tolist(), scores.tolist()))


def run(index, x, labels, task: str, query: Query) -> Ranking:
    """Rank ``index``'s sources for a target given as base-model embeddings (n, d)."""
    with one_blas_thread():
        x, labels, about, warnings = check_input(index.manifest["dim"], x, labels, task, query)
        scored = score(index, x, labels, task, query)
        method, scores = combine(scored.logme, scored.domain, query.method)
        order = top_order(scores, scored.logme, query.top)
        metas = index.store.metas(scored.found.ids[order])
        warnings += prefilter_warning(len(x), bool(scored.found.stage_scores["approximate"]), scored.pool_size)
        return Ranking(results(scored.found, order, metas, scores, scored.logme, scored.domain),
                       pool_size=scored.pool_size, timings=scored.timings, target=about, warnings=warnings,
                       method=method)


class Scored(NamedTuple):
    """The sources a query scored exactly, before ``combine`` orders them."""

    found: Shortlist
    logme: np.ndarray
    domain: np.ndarray  # NaN where a source has no domain vector
    pool_size: int
    timings: dict[str, float]


def score(index, x: np.ndarray, labels: np.ndarray, task: str, query: Query) -> Scored:
    """Every step before ``combine``, on a checked target. Apart from ``run`` because a
    sharded index (shards.py) runs it on each shard and combines over the union of the
    shards' sources ("combined" standardises over every source scored)."""
    timer = Timer()
    target = target_statistics(x, labels, task, index.device)
    allowed, pool_size = allowed_ids(index.store, query.filters)
    if query.exact or query.shortlist is None or query.shortlist >= pool_size:
        found, logme, domain = scan_stage(index.store, target, x, allowed, timer)
    else:
        prefilter, probe = index.prefilter(), index.probe
        stages = plan(pool_size, target.kernel_side(index.manifest["out_dim"]))
        view = TargetView(target, pool=(probe, prefilter.mean))
        candidates, refine = query.candidates or stages.candidates, query.refine or stages.refine
        faiss_k, approximate_k, refining_k = stages.directions
        timer.lap("prepare")
        found = faiss_stage(index.store, prefilter, view, probe, allowed, pool_size, candidates, faiss_k)
        timer.lap("faiss")
        found = approximate_stage(index.store, found, view, probe, max(query.shortlist, refine), approximate_k)
        timer.lap("approximate")
        found = refining_stage(index.store, found, view, query.shortlist, refining_k)
        if found.stage_scores["refining"]:
            timer.lap("refining")
        if query.method != "esm-logme":
            found = nearest_domains(index.store, found, prefilter, x, query.shortlist, allowed)
        timer.lap("load")
        logme = exact_stage(target, found)
        timer.lap("exact")
        domain = similarities(x, index.store.metas(found.ids))
    return Scored(found, logme, domain, pool_size, timer.timings)


def check_input(dim: int, x, labels, task: str, query: Query):
    """(x, labels, what the target is, warnings); refuses what cannot be ranked."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ModelMismatchError(f"target embeddings have shape {x.shape}; this index needs (n, {dim})")
    labels = np.asarray(labels)
    about = check_labels(labels, task, len(x))
    warnings = check_size(len(x), dim)
    check_query(query)
    return x, labels, about, warnings


def check_query(query: Query) -> None:
    check_stages(query.top, query.shortlist, query.exact, query.candidates, query.refine)
    check_method(query.method)


def target_statistics(x: np.ndarray, labels: np.ndarray, task: str, device: str | None) -> TargetStats:
    """What the scorer needs from the target, computed once (logme.TargetStats)."""
    return TargetStats.from_embeddings(x, labels, task == "regression", device=device or best_device())


def allowed_ids(store, filters: Filters | None) -> tuple[np.ndarray | None, int]:
    """(ids the filters accept, or None for all; the size of the pool ranked)."""
    if not filters:
        return None, store.count()
    allowed = np.asarray([i for i, m in store.iter_meta() if filters.accepts(m)], np.int64)
    if not len(allowed):
        raise NoSourcesError(f"no source of the index matches the filters ({filters.describe()})")
    return allowed, len(allowed)


def faiss_stage(store, prefilter: Prefilter, view: TargetView, probe: np.ndarray, allowed: np.ndarray | None,
                pool_size: int, candidates: int, directions: int) -> Shortlist:
    """The ``candidates`` best sources by the local linear score (every allowed source when
    the pool is no larger)."""
    if pool_size <= candidates:
        return Shortlist(store.ids() if allowed is None else allowed)
    ids, scores = prefilter.search(view, probe, store.manifest["out_dim"],
                                   candidates if allowed is None else store.count(), directions)
    if allowed is not None:
        keep = np.isin(ids, allowed)
        ids, scores = ids[keep][:candidates], scores[keep][:candidates]
    found = Shortlist(ids)
    found.record("faiss", ids, scores)
    return found


def approximate_stage(store, found: Shortlist, view: TargetView, probe: np.ndarray, size: int,
                      directions: int) -> Shortlist:
    """The ``size`` best by the approximate score, from the sources' summaries."""
    ids, summaries = store.summaries(found.ids)
    scores = approximate_scores(view, probe, summaries, store.manifest["out_dim"], directions)
    order = np.argsort(-scores)[:size]
    found.ids = ids[order]
    found.record("approximate", found.ids, scores[order])
    return found


def refining_stage(store, found: Shortlist, view: TargetView, size: int, directions: int) -> Shortlist:
    """The ``size`` best by the refining score, from the sources' full maps (loaded here and
    passed on to the exact stage); runs only when more than ``size`` sources are left."""
    found.ids, found.weights, found.biases = store.esms(found.ids)
    if len(found.ids) > size:
        scores = refining_scores(view, found.weights, found.biases, directions)
        keep = np.argsort(-scores)[:size]
        found.ids, found.weights, found.biases = found.ids[keep], found.weights[keep], found.biases[keep]
        found.record("refining", found.ids, scores[keep])
    return found


def nearest_domains(store, found: Shortlist, prefilter: Prefilter, x: np.ndarray, size: int,
                    allowed: np.ndarray | None) -> Shortlist:
    """Add the ``size`` sources whose domain vectors are nearest the target's, whatever
    their approximate score (domain.py), for the methods that use domain similarity."""
    near = prefilter.domain.search(x, size, allowed)
    ids, weights, biases = store.esms(near[~np.isin(near, found.ids)])
    found.ids = np.concatenate([found.ids, ids])
    found.weights, found.biases = np.concatenate([found.weights, weights]), np.concatenate([found.biases, biases])
    return found


def scan_stage(store, target: TargetStats, x: np.ndarray, allowed: np.ndarray | None,
               timer: Timer) -> tuple[Shortlist, np.ndarray, np.ndarray]:
    """(the sources, their ESM-LogME, their domain similarity) for every allowed source,
    streamed from the store a batch at a time; the maps and metadata of a batch are dropped
    once it is scored. Times "load" (reading) and "exact" (scoring) separately."""
    ids, logme, domain = [np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)]
    timer.lap("prepare")
    seconds = {"load": 0.0, "exact": 0.0}
    clock = time.perf_counter()
    for batch_ids, weights, biases, metas in store.iter_esms(allowed, metas=True):
        loaded = time.perf_counter()
        ids.append(batch_ids)
        logme.append(score_esms(target, torch.from_numpy(weights), torch.from_numpy(biases)))
        domain.append(similarities(x, metas))
        clock, seconds["load"], seconds["exact"] = (time.perf_counter(), seconds["load"] + loaded - clock,
                                                    seconds["exact"] + time.perf_counter() - loaded)
    seconds["load"] += time.perf_counter() - clock
    timer.add(seconds)
    return Shortlist(np.concatenate(ids)), np.concatenate(logme), np.concatenate(domain)


def exact_stage(target: TargetStats, found: Shortlist) -> np.ndarray:
    """ESM-LogME of every source left."""
    if not len(found.ids):
        return np.zeros(0)
    return score_esms(target, torch.from_numpy(found.weights), torch.from_numpy(found.biases))


def combine(logme: np.ndarray, domain: np.ndarray, method: str) -> tuple[str, np.ndarray]:
    """(the method that ranked, the score it orders by). Without a domain vector among the
    sources scored (hfselect's ESMs), "combined" is ESM-LogME and says so; "domain" fails."""
    if method == "combined" and not np.isfinite(domain).any():
        method = "esm-logme"
    elif method == "domain" and len(logme) and not np.isfinite(domain).any():
        raise NoSourcesError("no source scored has a domain vector, so there is nothing to rank by domain "
                             "similarity (sources made by 'esm-index add' or tools/build_pool.py have one)")
    return method, combine_scores(logme, domain, method)


def top_order(scores: np.ndarray, logme: np.ndarray, top: int) -> np.ndarray:
    """Positions of the ``top`` best, ties (no domain vector, by "domain") broken by ESM-LogME."""
    return np.lexsort((-logme, -scores))[:top]


def results(found: Shortlist, order: np.ndarray, metas: list[dict], scores: np.ndarray, logme: np.ndarray,
            domain: np.ndarray) -> list[Result]:
    """The sources at positions ``order``, best first; ``metas``: theirs, in that order."""
    optional = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    out = []
    for rank, (j, meta) in enumerate(zip(order, metas), 1):
        sid = int(found.ids[j])
        out.append(Result(rank, meta["name"], optional(scores[j]), float(logme[j]), optional(domain[j]),
                          *(found.stage_scores[s].get(sid) for s in STAGES),
                          meta={k: v for k, v in meta.items() if k not in HIDDEN_META}))
    return out
