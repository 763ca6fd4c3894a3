"""The prefilter: a FAISS search over summaries, and its files' lifecycle.

    faiss stage: local linear score over the whole pool (pools > ``candidates``) -> ``candidates``
      -> approximate stage: ``approximate_scores`` on their summaries          -> best ``refine``
      -> refining stage: ``refining_scores`` on their full maps                -> best ``shortlist``

query.py runs the stages; this module holds the FAISS side and how many sources each
stage passes on (``plan``).

The FAISS stage. A source's approximate score is a smooth function f of its summary S.
The summaries of a pool vary in few directions, so FAISS stores each as its PCA
coordinates z (S ~ mean + sum_j z_j B_j, 64 numbers) in an IVF index whose cells are K-means
cells in z. One linearisation of f for the whole pool is too coarse for crowded pools; one
per cell is not: a query evaluates f and its gradient g_c at every cell centre c (one small
batched LogME and one backward pass) and scores each source by f(c) + g_c . (z - c), an
inner product with its own cell's gradient, which is what IVF's ``search_preassigned``
computes, cell by cell. How well it keeps a target's exact top-5: BENCHMARKS.md section 6
(tools/bench/stage_ranks.py).

What the scores are and why they are accurate is in summary.py. The FAISS files are derived
data: written atomically, tagged with the LMDB generation they were built from and
checksummed, so a stale or damaged file is noticed and rebuilt from the store
(``PrefilterFiles``, the one place that builds, loads, saves and checks them).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .domain import DomainSearch, domain_batches
from .errors import InvalidArgumentError
from .summary import TargetView, centroid_scores, join_probe, pool_directions, summarize, summary_dim

LARGE_POOL = 20_000  # from here on the stages pass on more sources and keep more directions


@dataclass(frozen=True)
class Plan:
    """How many sources each stage passes on, and how many target directions it keeps."""

    candidates: int  # FAISS -> approximate stage
    refine: int  # approximate -> refining stage
    directions: tuple[int, int, int]  # (FAISS, approximate, refining)


def plan(pool_size: int, small_target: bool = False) -> Plan:
    """The default stages for a pool. A larger pool has more near-ties at the top, which only
    finer approximations separate, so it keeps more directions and passes more sources on
    (the sizes were measured at 10k and 100k sources: BENCHMARKS.md section 6).

    Up to 20k sources, measured on a 10k pool of strongly fine-tuned maps (BENCHMARKS.md
    section 6). ``small_target``: no more examples than the maps have output dimensions
    (LogME's kernel side, n <= D); all n of its directions enter its score. With 256 / 64
    sources passed on and 32 directions, a 77-example target lost its whole exact top-5 in
    the FAISS stage, a 112-example one in the refining stage; 512 / 128 and 64 refining
    directions kept every top-5 of 16 targets of 77-150 examples. A large target (n > D) is
    seen through the pool's mean map (summary.Pooled); 64 directions in every stage and the
    same 512 / 128 kept 0.625 of the exact top-5 of 8 targets of 500 examples (32
    directions: 0.45; 256 / 64: 0.225-0.375). The larger plan for pools past 20k is the same
    for every target size and was measured with 150-example targets only."""
    if pool_size <= LARGE_POOL:
        if small_target:
            return Plan(candidates=512, refine=128, directions=(32, 32, 64))
        return Plan(candidates=512, refine=128, directions=(64, 64, 64))
    return Plan(candidates=768, refine=384, directions=(64, 64, 128))


# ---- the FAISS index ---------------------------------------------------------------------
FAISS_FILE = "prefilter.faiss"
DOMAIN_FILE = "domain.faiss"  # domain.DomainSearch: the nearest domain vectors
META_FILE = "prefilter.json"
PCA_DIM = 64  # coordinates per source in the FAISS index
MAX_LISTS = 1024  # K-means cells (the centroids whose gradients a query computes)
PER_LIST = 200  # sources per cell
PCA_SAMPLE = 8192  # summaries the PCA is fitted on; K-means sees up to 64 per cell


@dataclass
class Prefilter:
    """The FAISS side of an index, for one generation of the store: an IVF-Flat index
    (inner product) over PCA coordinates z of the summaries, S ~ mean + sum_j z_j basis_j,
    whose cells are K-means cells in z. See the module docstring for why."""

    generation: int
    index: object  # faiss.IndexPreTransform(LinearTransform: PCA, IndexIVFFlat)
    mean: np.ndarray  # (width,) mean summary vector
    domain: DomainSearch  # the sources' domain vectors (domain.py), searched beside the summaries

    def __post_init__(self) -> None:
        import faiss  # here, not at the top: a query with --exact never needs it

        self.ivf = faiss.downcast_index(self.index.index)
        pca = faiss.downcast_VectorTransform(self.index.chain.at(0))
        self.basis = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)  # orthonormal rows
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        self.centroids = faiss.vector_to_array(quantizer.codes).view(np.float32).reshape(self.ivf.nlist, pca.d_out)
        self.longest = max(self.ivf.invlists.list_size(i) for i in range(self.ivf.nlist))

    def cells(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, PCA coordinates) of the sources in each non-empty cell."""
        import faiss

        lists, m = self.ivf.invlists, self.ivf.d
        for i in range(self.ivf.nlist):
            n = lists.list_size(i)
            if n:
                codes = faiss.rev_swig_ptr(lists.get_codes(i), n * m * 4).view(np.float32).reshape(n, m)
                yield faiss.rev_swig_ptr(lists.get_ids(i), n).astype(np.int64), codes.copy()

    def ids(self) -> np.ndarray:
        """Every source id the index holds (for ``verify``)."""
        parts = [ids for ids, _ in self.cells()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def search(self, view: TargetView, probe: np.ndarray, out_dim: int, k: int,
               directions: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """The k best sources by the local linear score: (ids, scores), best first."""
        f, g = centroid_scores(view, probe, self.mean, self.basis, self.centroids, out_dim, directions)
        offset = f - (g * self.centroids).sum(1)  # score ~ f_c + g_c . (z - c)
        cells = self.ivf.nlist
        inner, ids = self.ivf.search_preassigned(np.ascontiguousarray(g, np.float32), min(k, self.longest),
                                                 np.arange(cells)[:, None], np.zeros((cells, 1), np.float32))
        scores, ids = (inner + offset[:, None]).ravel(), ids.ravel()
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        order = np.argsort(-scores)[:k]
        return ids[order], scores[order]


def build_prefilter(store, generation: int, seed: int = 0) -> Prefilter:
    """Fit the PCA and the K-means cells on a sample of the summaries, then add them all."""
    import faiss

    width, ids = store.manifest["summary_dim"], store.ids()
    rng = np.random.default_rng(seed)
    _, sample = store.summaries(np.sort(rng.permutation(ids)[:PCA_SAMPLE]))
    if len(sample) == 0:
        sample = np.zeros((1, width), np.float32)
    mean = sample.mean(0, dtype=np.float64).astype(np.float32)
    q = max(1, min(PCA_DIM + 8, len(sample), width))
    centred = torch.from_numpy(sample - mean)
    _, _, v = torch.svd_lowrank(centred, q=q, niter=4) if len(sample) > 1 else (None, None, torch.eye(width)[:, :1])
    basis = v[:, :min(PCA_DIM, q)].T.contiguous().numpy()  # (m, width)
    pca = faiss.LinearTransform(width, basis.shape[0], True)
    faiss.copy_array_to_vector(basis.ravel(), pca.A)
    faiss.copy_array_to_vector(-(basis @ mean), pca.b)
    pca.is_trained = True
    cells = int(np.clip(len(ids) // PER_LIST, 1, MAX_LISTS))
    if len(ids) > len(sample) and 64 * cells > len(sample):  # K-means wants ~40+ points per cell
        _, sample = store.summaries(np.sort(rng.permutation(ids)[:64 * cells]))
    z = np.concatenate([pca.apply(np.ascontiguousarray(sample[i:i + 4096])) for i in range(0, len(sample), 4096)])
    if cells > 1:
        kmeans = faiss.Kmeans(z.shape[1], cells, niter=20, seed=seed + 1)
        kmeans.train(z)
        centroids = kmeans.centroids
    else:
        centroids = z.mean(0, keepdims=True)
    quantizer = faiss.IndexFlatL2(z.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, np.float32))
    ivf = faiss.IndexIVFFlat(quantizer, z.shape[1], cells, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexPreTransform(pca, ivf)
    for chunk_ids, vecs in store.iter_summaries():
        index.add_with_ids(np.ascontiguousarray(vecs), chunk_ids)
    return Prefilter(generation, index, mean, DomainSearch.build(store.manifest["dim"],
                                                                 domain_batches(store, store.manifest["dim"])))


def save_prefilter(folder: Path, prefilter: Prefilter) -> None:
    """Write the FAISS index and its tag (generation, checksum, mean summary) atomically."""
    import faiss

    data = faiss.serialize_index(prefilter.index).tobytes()
    domain = faiss.serialize_index(prefilter.domain.index).tobytes()
    for name, raw in ((FAISS_FILE, data), (DOMAIN_FILE, domain)):
        tmp = folder / f"{name}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, folder / name)
    info = {"generation": prefilter.generation, "count": int(prefilter.index.ntotal),
            "factory": f"PCA{prefilter.basis.shape[0]},IVF{prefilter.ivf.nlist},Flat (inner product)",
            "sha256": hashlib.sha256(data).hexdigest(), "mean_summary": prefilter.mean.tolist(),
            "domain_count": len(prefilter.domain), "domain_sha256": hashlib.sha256(domain).hexdigest()}
    tmp = folder / f"{META_FILE}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / META_FILE)


def load_prefilter(folder: Path, generation: int) -> Prefilter | None:
    """The prefilter from its files, or None if they are missing, were built from another
    generation of the store, or fail their checksum."""
    import faiss

    try:
        info = json.loads((folder / META_FILE).read_text())
        if info.get("generation") != generation:
            return None
        data, domain = (folder / FAISS_FILE).read_bytes(), (folder / DOMAIN_FILE).read_bytes()
        if (hashlib.sha256(data).hexdigest() != info.get("sha256")
                or hashlib.sha256(domain).hexdigest() != info.get("domain_sha256")):
            return None
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        return Prefilter(generation, index, np.asarray(info["mean_summary"], np.float32),
                         DomainSearch(faiss.deserialize_index(np.frombuffer(domain, np.uint8))))
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError):  # AttributeError: an older layout
        return None


class PrefilterFiles:
    """The prefilter of one index folder through its life: built from the store, saved beside
    it, loaded while current with the store's generation, rebuilt when stale or damaged (in
    memory only when the index is read-only). It also keeps the probe the summaries were
    computed on, refitted to the pool on the first rebuild (see summary.py)."""

    def __init__(self, folder: Path, store, readonly: bool) -> None:
        self.folder, self.store, self.readonly = Path(folder), store, readonly
        self.probe = store.probe()
        self._lock = threading.RLock()
        self._current: Prefilter | None = None

    def current(self) -> Prefilter:
        """The prefilter of the store's current generation."""
        with self._lock:
            gen = self.store.generation()
            if self._current is None or self._current.generation != gen:
                self.store.reload_manifest()  # another process may have refitted the probe
                self.probe = self.store.probe()
                self._current = load_prefilter(self.folder, gen)
                if self._current is None:
                    self.rebuild()
            return self._current

    def rebuild(self, reprobe: bool = False, probe_dim: int | None = None) -> None:
        """Regenerate the FAISS files from the store. The first rebuild of a writable index
        with at least 8 sources (or ``reprobe``) also fits the pool half of the probe and
        recomputes every summary; ``probe_dim`` (with ``reprobe``) changes the probe's size."""
        with self._lock:
            if probe_dim is not None and reprobe and self.store.count() < 8:
                raise InvalidArgumentError(f"a new probe needs at least 8 sources to fit on; the index has "
                                           f"{self.store.count()}")
            if (not self.readonly and (reprobe or not self.store.manifest.get("probe_pool_fitted"))
                    and self.store.count() >= 8):
                self._fit_probe(probe_dim if reprobe else None)
            self._current = build_prefilter(self.store, self.store.generation())
            if not self.readonly:
                save_prefilter(self.folder, self._current)

    def _fit_probe(self, probe_dim: int | None = None, sample: int = 256) -> None:
        k = probe_dim or self.probe.shape[1]
        reference = self.store.probe("reference")
        largest = min(reference.shape[0], 2 * reference.shape[1])  # half the probe is reference directions
        if not 2 <= k <= largest:
            raise InvalidArgumentError(f"probe dimension {k}: this index holds {reference.shape[1]} reference "
                                       f"directions of {reference.shape[0]}, enough for a probe of 2 to {largest}")
        ids = np.random.default_rng(0).permutation(self.store.ids())[:sample]
        _, w, b = self.store.esms(ids)
        probe = join_probe(reference, pool_directions(w, b, k // 2), k)
        described = self.store.manifest.get("summary", "").replace(f"U: {self.probe.shape[1]} directions",
                                                                   f"U: {k} directions")
        self.store.reprobe(probe, lambda ww, bb: summarize(ww, bb, probe),
                           {"probe_pool_fitted": True, "probe_pool_sample": len(ids), "summary_dim": summary_dim(k),
                            "summary": described})
        self.probe = probe

    def problems(self) -> list[str]:
        """What ``verify`` reports about the files (empty when current and complete)."""
        loaded = load_prefilter(self.folder, self.store.generation())
        if loaded is None:
            return ["prefilter files missing, unreadable or stale (run 'esm-index rebuild')"]
        faiss_ids, store_ids = np.sort(loaded.ids()), np.sort(self.store.ids())
        if not np.array_equal(faiss_ids, store_ids):
            return [f"FAISS holds {len(faiss_ids)} sources, LMDB {len(store_ids)}"]
        return []

    def describe(self) -> dict:
        """The files as saved: the FAISS factory string and their size on disk."""
        try:
            kind = json.loads((self.folder / META_FILE).read_text()).get("factory", "?")
        except (OSError, ValueError):
            kind = "missing (run 'esm-index rebuild')"
        paths = [self.folder / name for name in (FAISS_FILE, DOMAIN_FILE)]
        return {"prefilter": kind, "faiss_bytes": sum(p.stat().st_size for p in paths if p.exists())}
