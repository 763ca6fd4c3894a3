"""Domain similarity, and the ranking that combines it with ESM-LogME.

ESM-LogME asks "how well do the labels fit the source's mapped space?". It does not ask
whether the source saw texts like the target's, and on our pool that second question
matters: a source fine-tuned on the target's own kind of text carries its task, and the
transfer ground truth (BENCHMARKS.md, "transfer") found domain similarity alone a better
guide than ESM-LogME alone. So each source also keeps its *domain vector*, the mean
base-model embedding of the texts its map was fitted on (384 floats in its metadata,
``domain_mean``), and a target is compared with it by cosine:

    domain(s) = cos(mean_i x_i, m_s)          x_i: the target's base embeddings

The default ranking (``method="combined"``) adds the two signals on a common scale, each
standardised over the sources scored exactly for this query, z(v) = (v - mean v) / sd v:

    order by  z(ESM-LogME)(s) + DOMAIN_WEIGHT * z(domain)(s)

and reports it in ESM-LogME's units (the same order: an increasing affine map of the sum),

    score(s) = ESM-LogME(s) + DOMAIN_WEIGHT * sd(ESM-LogME) * z(domain)(s),

so a score is its source's ESM-LogME plus a domain bonus (or malus), and a pool without
domain vectors is ranked, and scored, exactly as by ESM-LogME.

The weight (48 since session 14; 12 in session 13, 6 before) is the one that did best on
both checks in BENCHMARKS.md. On the linear-probe transfer ground truth (27 targets, 13-15
candidates of other kinds each) it has regret@3 1.74 % against 2.15 % at 12, and it is the
weight chosen on the other targets (leave one target out) for all 27. The two smaller,
noisier studies (8 candidates) choose 3 and 24, but 48 is no worse than 12 on regret@3 in
either, and better on regret@1 in all three. On same-task retrieval it is as good as 12
(own source first for 24 of 26 pool tasks, every sample first). At this weight the domain
term decides between sources of different kinds of text, and ESM-LogME breaks near-ties
between sources on the same kind of text (a sentiment task and a topic task on the same
comments; the movie sample's own task against its twin), where domain similarity alone
cannot tell them apart. On the largest transfer study no larger share for ESM-LogME did
better than domain similarity alone, as the README's limitations say.

A source without a domain vector (an ESM imported from hfselect, which has none) gets
z = 0, the middle of the set, for the domain term.

For pools larger than the shortlist, ``DomainSearch`` (a FAISS inner-product index of the
normalised domain vectors, built with the prefilter) adds the target's nearest domains to
the sources the prefilter passes to the exact scorer, so that a source of the target's own
kind of text is scored even when its approximate ESM-LogME is not among the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError
from .results import DEFAULT_METHOD, METHODS

DOMAIN_WEIGHT = 48.0
DOMAIN_KEY = "domain_mean"  # the metadata field that holds a source's domain vector


def domain_vector(base_embeddings: np.ndarray) -> list[float]:
    """A source's domain vector from the base embeddings of its texts, as stored in its
    metadata (rounded: six decimals are far below the spread between domains)."""
    return [round(float(v), 6) for v in np.asarray(base_embeddings, np.float64).mean(0)]


def unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    v = np.asarray(v, np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1)


def similarities(target: np.ndarray, metas: list[dict]) -> np.ndarray:
    """cos(target mean embedding, each source's domain vector); NaN where a source has none."""
    t = unit(np.asarray(target, np.float64).mean(0))
    out = np.full(len(metas), np.nan, np.float64)
    for i, meta in enumerate(metas):
        vec = meta.get(DOMAIN_KEY) if meta else None
        if vec is not None and len(vec) == len(t):
            out[i] = float(unit(np.asarray(vec)) @ t)
    return out


def standardise(v: np.ndarray) -> np.ndarray:
    """z-scores over the finite entries; NaN (no domain vector) and a constant set give 0."""
    v = np.asarray(v, np.float64)
    ok = np.isfinite(v)
    z = np.zeros_like(v)
    if ok.sum() > 1 and v[ok].std() > 0:
        z[ok] = (v[ok] - v[ok].mean()) / v[ok].std()
    return z


def combine(logme: np.ndarray, domain: np.ndarray, method: str = DEFAULT_METHOD,
            weight: float = DOMAIN_WEIGHT) -> np.ndarray:
    """The ranking score of each scored source under ``method`` (see the module docstring);
    ``weight`` is there for the studies that chose it (tools/eval_pool.py --weights)."""
    if method == "esm-logme":
        return np.asarray(logme, np.float64)
    if method == "domain":  # no domain vector: below every source that has one
        return np.where(np.isfinite(domain), domain, -np.inf)
    if method == "combined":
        logme = np.asarray(logme, np.float64)
        spread = logme.std() if len(logme) > 1 else 0.0
        return logme + weight * spread * standardise(domain)
    raise InvalidArgumentError(f"unknown ranking method {method!r}; one of {', '.join(METHODS)}")


@dataclass
class DomainSearch:
    """The sources with the nearest domain vectors: FAISS inner product over unit vectors,
    kept as float16 (768 bytes a source; only a shortlist comes from it, the cosines that
    rank are recomputed from the metadata)."""

    index: object  # faiss.IndexIDMap2 over an IndexScalarQuantizer (fp16, inner product)

    @classmethod
    def build(cls, dim: int, batches) -> "DomainSearch":
        """From (ids, vectors) batches; sources without a vector are simply not in it."""
        import faiss

        index = faiss.IndexIDMap2(faiss.index_factory(dim, "SQfp16", faiss.METRIC_INNER_PRODUCT))
        for ids, vecs in batches:
            if len(ids):
                index.add_with_ids(np.ascontiguousarray(unit(vecs)), np.asarray(ids, np.int64))
        return cls(index)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, target: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Ids of the (at most) ``k`` sources nearest to the target's mean embedding."""
        import faiss

        if k < 1 or not len(self):
            return np.zeros(0, np.int64)
        query = unit(np.asarray(target, np.float64).mean(0))[None]
        params = None if allowed is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(
            np.asarray(allowed, np.int64)))
        _, ids = self.index.search(np.ascontiguousarray(query, np.float32), min(k, len(self)), params=params)
        return ids[0][ids[0] >= 0]


def domain_batches(store, dim: int, batch: int = 4096):
    """(ids, domain vectors) of the stored sources that have one, in batches (for ``build``)."""
    ids, vecs = [], []
    for sid, meta in store.iter_meta():
        vec = meta.get(DOMAIN_KEY)
        if vec is not None and len(vec) == dim:
            ids.append(sid)
            vecs.append(vec)
        if len(ids) >= batch:
            yield np.asarray(ids, np.int64), np.asarray(vecs, np.float32)
            ids, vecs = [], []
    yield np.asarray(ids, np.int64), np.asarray(vecs, np.float32).reshape(len(ids), dim)
