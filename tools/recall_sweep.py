#!/usr/bin/env python3
"""Recall of the exact top-5 and latency of the prefiltered query, for several
shortlist/candidates/refine settings, on a pool built by tools/bench_query.py.

The exact scores of the whole pool are computed once (or read from --exact-cache), then each
setting runs the default query path for every target.

Usage: python tools/recall_sweep.py /tmp/esm-bench/pool-10000 default 32/1024/128 32/2048/256 ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_query import targets  # noqa: E402
from esm_index.index import SourceIndex  # noqa: E402
from esm_index.logme import TargetStats, score_esms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pool", type=Path)
    ap.add_argument("settings", nargs="+", help="shortlist/candidates/refine, or default (prefilter.plan)")
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--exact-cache", type=Path, default=None, help="npz of exact scores to reuse or write")
    args = ap.parse_args()
    index = SourceIndex(args.pool, readonly=True)
    index.prefilter()
    tasks = targets(args.targets)
    if args.exact_cache and args.exact_cache.exists():
        data = np.load(args.exact_cache)
        exact, ids = data["exact"], data["ids"]
    else:
        ids = index.store.ids()
        stats = [TargetStats.from_embeddings(x, y) for _, x, y in tasks]
        exact = np.zeros((len(tasks), len(ids)))
        for start in range(0, len(ids), 1024):
            found, w, b = index.store.esms(ids[start:start + 1024])
            for j, st in enumerate(stats):
                exact[j, start:start + len(found)] = score_esms(st, torch.from_numpy(w), torch.from_numpy(b))
        if args.exact_cache:
            np.savez(args.exact_cache, exact=exact, ids=ids)
    for setting in args.settings:
        shortlist, candidates, refine = (32, None, None) if setting == "default" else map(int, setting.split("/"))
        hits, latency = [], []
        for j, (_, x, y) in enumerate(tasks):
            truth = set(ids[np.argsort(-exact[j])[:5]].tolist())
            t0 = time.perf_counter()
            ranking = index.rank_embeddings(x, y, top=5, shortlist=shortlist, candidates=candidates, refine=refine)
            latency.append(time.perf_counter() - t0)
            hits.append(len(truth & {index.store.id_of(r.source) for r in ranking.results}) / 5)
        print(f"{setting}: recall@5 {np.mean(hits):.3f} {hits} p50 {np.median(latency):.3f} s, "
              f"last timings {ranking.timings}", flush=True)


if __name__ == "__main__":
    main()
