#!/usr/bin/env python3
"""Recall of the exact top-5 and latency of the prefiltered query, for several stage settings,
on a pool built by tools/bench/bench_query.py.

The exact scores of the whole pool are computed once (or read from --exact-cache), then each
setting runs the query path for every target. A setting is ``default`` (prefilter.plan's
stage sizes) or CANDIDATES/REFINE/SHORTLIST: the sources the FAISS, approximate and refining
stages pass on, as BENCHMARKS.md §6 writes them.

Usage: python tools/bench/recall_sweep.py /tmp/esm-bench/pool-10000 default 256/64/16 512/256/32 \\
           --exact-cache /tmp/exact10k.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import shared


def main() -> None:
    from esm_index.index import SourceIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pool", type=Path)
    ap.add_argument("settings", nargs="+", help="default, or CANDIDATES/REFINE/SHORTLIST (e.g. 256/64/32)")
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--rows", type=int, default=shared.TARGET_ROWS,
                    help="held-out rows per target (fewer where a task has fewer)")
    ap.add_argument("--exact-cache", type=Path, default=None, help="npz of exact scores to reuse or write")
    args = ap.parse_args()
    options = {setting: shared.parse_setting(setting) for setting in args.settings}  # refuse a typo before the scan
    index = SourceIndex(args.pool, readonly=True)
    index.prefilter()
    tasks = shared.targets(index, args.targets, rows=args.rows)
    ids, exact = shared.exact_scores(index, tasks, args.exact_cache)
    for setting in args.settings:
        misses: list = []
        hits, latency, ranking = shared.recall_at5(index, tasks, ids, exact, misses, **options[setting])
        per_target = {name: hit for (name, _, _), hit in zip(tasks, hits)}
        print(f"{setting}: recall@5 {np.mean(hits):.3f} {per_target} p50 {np.median(latency):.3f} s, "
              f"last timings {ranking.timings}", flush=True)
        worst = {name: f"#{rank} (-{gap:.2g})" for (name, _, _), (rank, gap) in zip(tasks, misses) if rank > 5}
        print(f"  lowest exact place of a returned top-5 source (its score below the exact 5th): {worst or 'none'}; "
              f"largest shortfall {max(gap for _, gap in misses):.3g}", flush=True)


if __name__ == "__main__":
    main()
