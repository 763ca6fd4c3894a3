#!/usr/bin/env python3
"""Scale: synthetic pools of N sources at d=384 - import throughput, disk, query latency,
peak RSS, and the recall of the exact top-5 in the default (prefiltered) query.

Synthetic sources are realistic perturbations of real ESMs: each is a random mixture of
three real ESMs from a seed index (Dirichlet weights) plus small noise, so the pool has the
structure of real maps rather than of random matrices. Targets are the real tasks' probe
samples (base-model embeddings cached by tools/build_pool.py), each scored against the pool.

Each size runs in its own process so peak RSS is that size's alone:
    python tools/bench_query.py --sizes 10000 100000 --root /tmp/esm-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE = Path(os.environ.get("ESM_INDEX_CACHE", Path.home() / ".cache" / "esm-index"))


def seed_esms(seed_index: Path) -> tuple[np.ndarray, np.ndarray]:
    from esm_index.index import SourceIndex

    with SourceIndex(seed_index, readonly=True) as index:
        _, w, b = index.store.esms(index.store.ids())
    return w, b


def synthetic(w: np.ndarray, b: np.ndarray, start: int, count: int) -> list:
    """Sources start..start+count-1, each reproducible from its number."""
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


def targets(limit: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    probes = CACHE / "pool" / "_probes"
    names = json.loads((probes / "order.json").read_text())
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(names), min(limit, len(names)), replace=False))
    out = []
    for i in chosen:
        data = np.load(probes / f"{names[i]}.npz")
        out.append((names[i], data["base"], data["labels"]))
    return out


def run_size(n: int, root: Path, seed_index: Path, n_targets: int, queries: int, grid: list[str]) -> dict:
    import torch

    from esm_index.index import SourceIndex
    from esm_index.logme import TargetStats, score_esms

    folder = root / f"pool-{n}"
    result: dict = {"sources": n}
    w, b = seed_esms(seed_index)
    if not (folder / "store.lmdb").exists():
        index = SourceIndex.create(folder)
        index.close()
    index = SourceIndex(folder)
    have = len(index)
    if have < n:
        t0 = time.perf_counter()
        chunk = 2048
        for start in range(have, n, chunk):
            index.add_esms(synthetic(w, b, start, min(chunk, n - start)), batch_size=256)
        result["import_esms_per_s"] = round((n - have) / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    index.rebuild()
    result["rebuild_s"] = round(time.perf_counter() - t0, 2)
    result["lmdb_gb"] = round(index.store.disk_bytes() / 1e9, 2)
    result["faiss_mb"] = round((folder / "prefilter.faiss").stat().st_size / 1e6, 1)

    tasks = targets(n_targets)
    latencies = []
    index.prefilter()  # load FAISS once, as a long-lived service would
    for name, x, y in tasks:
        for _ in range(queries):
            t0 = time.perf_counter()
            ranking = index.rank_embeddings(x, y, top=5)
            latencies.append(time.perf_counter() - t0)
        result.setdefault("timings_example", ranking.timings)
    result["p50_s"] = round(float(np.percentile(latencies, 50)), 3)
    result["p95_s"] = round(float(np.percentile(latencies, 95)), 3)

    result["peak_rss_gb_queries"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    if not grid:
        return result
    # Exact scores of the whole pool for every target, in one pass over the store.
    stats = [TargetStats.from_embeddings(x, y) for _, x, y in tasks]
    ids = index.store.ids()
    exact = np.zeros((len(tasks), len(ids)))
    t0 = time.perf_counter()
    for start in range(0, len(ids), 1024):
        found, wc, bc = index.store.esms(ids[start:start + 1024])
        for j, st in enumerate(stats):
            exact[j, start:start + len(found)] = score_esms(st, torch.from_numpy(wc), torch.from_numpy(bc), batch_size=256)
    result["exact_scan_s_per_target"] = round((time.perf_counter() - t0) / len(tasks), 1)
    recall = {}
    for setting in grid:
        shortlist, candidates = map(int, setting.split("/"))
        hits = []
        for j, (name, x, y) in enumerate(tasks):
            truth = set(ids[np.argsort(-exact[j])[:5]].tolist())
            got = index.rank_embeddings(x, y, top=5, shortlist=shortlist, candidates=candidates).results
            hits.append(len(truth & {index.store.id_of(r.source) for r in got}) / 5)
        recall[setting] = round(float(np.mean(hits)), 3)
    result["recall_at5_by_shortlist/candidates"] = recall
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--root", type=Path, default=Path("/tmp/esm-bench"))
    ap.add_argument("--seed-index", type=Path, default=REPO / "indexes" / "default")
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--queries", type=int, default=3, help="timed queries per target")
    ap.add_argument("--grid", nargs="*", default=["32/1024", "32/2048"],
                    help="shortlist/candidates settings whose recall is measured (none: skip the exact scan)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_size(args.one, args.root, args.seed_index, args.targets, args.queries, args.grid)), flush=True)
        return
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--root", str(args.root),
                              "--seed-index", str(args.seed_index), "--targets", str(args.targets),
                              "--queries", str(args.queries), "--grid", *args.grid], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], flush=True)
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
