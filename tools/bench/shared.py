"""What the benchmark scripts share: where the checkout and the cache are, the synthetic pools,
the real targets, and the exact scan that gives a query's ground truth.

Every script in tools/bench/ starts with ``import shared`` (Python puts a script's own folder
first on ``sys.path``). Importing it puts the checkout and tools/ on ``sys.path``, so
``esm_index`` and ``tools/common.py`` (the cache's one definition) import, and sets
HF_HUB_OFFLINE, since no benchmark downloads anything.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent.parent
REPO = TOOLS.parent
for _path in (str(TOOLS), str(REPO)):  # REPO first: this checkout's esm_index
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import CACHE, SAMPLES, base_embeddings, load_task, split, task_ids  # noqa: E402

__all__ = ["CACHE", "REPO", "SAMPLES", "TOOLS", "exact_scores", "grow_pool", "parse_setting", "recall_at5",
           "sample_texts", "seed_esms", "synthetic", "targets"]
DEFAULT_POOL = REPO / "indexes" / "default"
TARGET_ROWS = 150  # texts per real target (the size of the old probe samples)


# ---- synthetic pools -----------------------------------------------------------------------
def seed_esms(seed_index: Path = DEFAULT_POOL) -> tuple[np.ndarray, np.ndarray]:
    """Every ESM of ``seed_index`` as stacks (B, D, d), (B, D)."""
    from esm_index.index import SourceIndex

    with SourceIndex(seed_index, readonly=True) as index:
        _, w, b = index.store.esms(index.store.ids())
    return w, b


def synthetic(w: np.ndarray, b: np.ndarray, start: int, count: int) -> list:
    """Sources start..start+count-1, each a Dirichlet(0.5) mixture of three seed ESMs plus
    small noise, reproducible from its number."""
    from esm_index.esm import ESM

    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        pick = rng.choice(len(w), 3, replace=False)
        mix = rng.dirichlet(np.full(3, 0.5))
        wi = np.tensordot(mix, w[pick], 1) + rng.standard_normal(w.shape[1:]) * 0.002
        bi = mix @ b[pick] + rng.standard_normal(b.shape[1]) * 0.002
        out.append((f"syn{i:07d}", ESM(wi, bi, {"task_id": f"syn{i}", "language": "en", "num_examples": 1000})))
    return out


def grow_pool(folder: Path, n: int, seed_index: Path = DEFAULT_POOL, progress: bool = False) -> tuple[int, float]:
    """Create ``folder`` if needed and add synthetic sources until it holds ``n`` (resumable).
    Returns (sources added, seconds spent adding them); the caller rebuilds the prefilter."""
    from esm_index.index import SourceIndex

    if not (folder / "store.lmdb").exists():
        SourceIndex.create(folder).close()
    with SourceIndex(folder) as index:
        have = len(index)
        if have >= n:
            return 0, 0.0
        w, b = seed_esms(seed_index)
        t0 = time.perf_counter()
        for start in range(have, n, 2048):
            index.add_esms(synthetic(w, b, start, min(2048, n - start)), batch_size=256)
            if progress:
                print(f"  {min(start + 2048, n)} / {n} sources", file=sys.stderr, flush=True)
        return n - have, time.perf_counter() - t0


# ---- real targets --------------------------------------------------------------------------
class _LazyEmbedder:
    """The index's spec, and its base model loaded only when an embedding is not cached."""

    def __init__(self, index) -> None:
        self.index, self.spec = index, index.spec

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.index.embedder.embed(texts)


def targets(index, limit: int, rows: int = TARGET_ROWS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Up to ``limit`` real targets (name, base embeddings, labels), the same ones every run.

    The §6 figures of BENCHMARKS.md were measured on the probe samples that the old
    build_pool.py wrote to CACHE/pool/_probes; they are read when present. Otherwise a target
    is ``rows`` of a prepared task's held-out target rows (common.split), embedded once into
    CACHE/base, where eval_pool.py's embeddings of the same rows already are.
    """
    import json

    probes = CACHE / "pool" / "_probes"
    old = (probes / "order.json").is_file()
    names = json.loads((probes / "order.json").read_text()) if old else task_ids()
    chosen = sorted(np.random.default_rng(0).choice(len(names), min(limit, len(names)), replace=False))
    out = []
    for i in chosen:
        if old:
            data = np.load(probes / f"{names[i]}.npz")
            out.append((names[i], data["base"], data["labels"]))
            continue
        task, _ = load_task(names[i])
        _, held_out = split(names[i], len(task))
        x = base_embeddings(_LazyEmbedder(index), [task.texts[j] for j in held_out])
        pick = np.sort(np.random.default_rng(i).permutation(len(held_out))[:rows])
        out.append((names[i], x[pick], task.labels[held_out][pick]))
    return out


def sample_texts() -> tuple[list[str], list[int]]:
    """The movie-review and SMS sample targets as one 4-class task (600 real texts)."""
    from esm_index.data import read_table

    texts, labels = [], []
    for offset, name in enumerate(("movie_reviews", "sms_spam")):
        rows = read_table(SAMPLES / f"{name}.csv")
        names = sorted({r["label"] for r in rows})
        texts += [r["text"] for r in rows]
        labels += [2 * offset + names.index(r["label"]) for r in rows]
    return texts, labels


# ---- ground truth and recall -----------------------------------------------------------------
def exact_scores(index, tasks: list, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores (targets, sources)): the exact ESM-LogME of every source of ``index`` for
    every target, in one pass over the store. Read from / written to the npz ``cache``."""
    import torch

    from esm_index.logme import TargetStats, score_esms

    if cache and cache.exists():
        data = np.load(cache)
        return data["ids"], data["exact"]
    ids = index.store.ids()
    stats = [TargetStats.from_embeddings(x, y) for _, x, y in tasks]
    exact = np.zeros((len(tasks), len(ids)))
    for start in range(0, len(ids), 1024):
        found, w, b = index.store.esms(ids[start:start + 1024])
        w, b = torch.from_numpy(w), torch.from_numpy(b)
        for j, st in enumerate(stats):
            exact[j, start:start + len(found)] = score_esms(st, w, b)
    if cache:
        np.savez(cache, exact=exact, ids=ids)
    return ids, exact


def parse_setting(setting: str) -> dict:
    """Query options from "default" (prefilter.plan's stage sizes, shortlist 32) or
    "CANDIDATES/REFINE/SHORTLIST", the sources each stage passes on, in the order the query
    runs them (BENCHMARKS.md §6 writes them so)."""
    if setting == "default":
        return {}
    try:
        candidates, refine, shortlist = map(int, setting.split("/"))
    except ValueError:
        raise SystemExit(f"setting {setting!r}: write default or CANDIDATES/REFINE/SHORTLIST, e.g. 256/64/32")
    if not candidates >= refine >= shortlist > 0:
        raise SystemExit(f"setting {setting!r}: CANDIDATES/REFINE/SHORTLIST must shrink (e.g. 256/64/32)")
    return {"candidates": candidates, "refine": refine, "shortlist": shortlist}


def recall_at5(index, tasks: list, ids: np.ndarray, exact: np.ndarray, misses: list | None = None,
               **options) -> tuple[list, list, object]:
    """For each target, the share of its exact top-5 that the prefiltered query (ranked by
    ESM-LogME, as the exact scores are) returns in its top 5, and the query's seconds.
    Returns (hits, latencies, the last Ranking). ``misses``, when given, gets one
    (worst exact rank, shortfall) per target for what the query returned in its top 5: the
    lowest exact place among them (1-based) and how far its exact score is below the exact
    5th best (0 when the top 5 is the exact one): how much a miss costs."""
    hits, latencies, ranking = [], [], None
    column = {int(i): c for c, i in enumerate(ids)}
    for j, (_, x, y) in enumerate(tasks):
        order = np.argsort(-exact[j])
        truth = set(ids[order[:5]].tolist())
        t0 = time.perf_counter()
        ranking = index.rank_embeddings(x, y, top=5, method="esm-logme", **options)
        latencies.append(time.perf_counter() - t0)
        returned = [index.store.id_of(r.source) for r in ranking.results]
        hits.append(len(truth & set(returned)) / 5)
        if misses is not None:
            place = np.empty(len(ids), np.int64)
            place[order] = np.arange(len(ids))
            worst = int(max(place[column[i]] for i in returned))
            misses.append((worst + 1, float(exact[j][order[4]] - exact[j][order[worst]])))
    return hits, latencies, ranking
