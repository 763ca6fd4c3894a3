#!/usr/bin/env python3
"""Scale: synthetic pools of N sources at d=384 - import throughput, disk, query latency,
peak RSS, and the recall of the exact top-5 in the default (prefiltered) query.

Synthetic sources are realistic perturbations of real ESMs: each is a random mixture of
three real ESMs from a seed index (Dirichlet weights) plus small noise, so the pool has the
structure of real maps rather than of random matrices. Targets are real tasks' held-out
rows (``shared.targets``), each scored against the pool. Recall is measured only for the
``--grid`` settings (an exact scan of the whole pool); recall_sweep.py does it on a built pool.

Each size runs in its own process so peak RSS is that size's alone:
    python tools/bench/bench_query.py --sizes 10000 100000 --root /tmp/esm-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import shared


def run_size(n: int, root: Path, seed_index: Path, n_targets: int, queries: int, grid: list[str]) -> dict:
    from esm_index.index import SourceIndex

    folder = root / f"pool-{n}"
    result: dict = {"sources": n}
    added, seconds = shared.grow_pool(folder, n, seed_index)
    if added:
        result["import_esms_per_s"] = round(added / seconds, 1)
    index = SourceIndex(folder)
    t0 = time.perf_counter()
    index.rebuild()
    result["rebuild_s"] = round(time.perf_counter() - t0, 2)
    result["lmdb_gb"] = round(index.store.disk_bytes() / 1e9, 2)
    result["faiss_mb"] = round((folder / "prefilter.faiss").stat().st_size / 1e6, 1)

    tasks = shared.targets(index, n_targets)
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
    t0 = time.perf_counter()
    ids, exact = shared.exact_scores(index, tasks)
    result["exact_scan_s_per_target"] = round((time.perf_counter() - t0) / len(tasks), 1)
    result["recall_at5"] = {setting: round(float(np.mean(shared.recall_at5(index, tasks, ids, exact,
                                                                             **shared.parse_setting(setting))[0])), 3)
                            for setting in grid}
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--root", type=Path, default=Path("/tmp/esm-bench"))
    ap.add_argument("--seed-index", type=Path, default=shared.DEFAULT_POOL)
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--queries", type=int, default=3, help="timed queries per target")
    ap.add_argument("--grid", nargs="*", default=[],
                    help="settings whose recall@5 is measured after an exact scan of the whole pool: default or "
                         "CANDIDATES/REFINE/SHORTLIST, e.g. default 512/256/32 (none, the default: no scan; "
                         "recall_sweep.py does it on a built pool)")
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
