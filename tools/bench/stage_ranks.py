#!/usr/bin/env python3
"""Where each cheap score puts the exact top-5: the diagnostic behind prefilter.plan.

For every target, the worst rank of its exact top-5 sources under:
* the FAISS stage's local linear score, over the whole pool, keeping 32 or 64 directions;
* the approximate score (summaries, ``approximate_scores``) and the refining score (full maps,
  ``refining_scores``), over the exact top ``--within`` sources, keeping k directions.
A stage keeps the top-5 when these ranks stay below what it passes on (``plan``).

Needs a pool from tools/bench/bench_query.py. The exact scores are read from --exact-cache
(recall_sweep.py writes the same file for the same --targets) or computed and written there.

Usage: python tools/bench/stage_ranks.py /tmp/esm-bench/pool-10000 --exact-cache /tmp/exact10k.npz --targets 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import shared
from esm_index.index import SourceIndex  # noqa: E402 - shared puts the checkout on sys.path
from esm_index.logme import TargetStats  # noqa: E402
from esm_index.summary import TargetView, approximate_scores, refining_scores  # noqa: E402


def worst_rank(ids: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> int:
    order = ids[np.argsort(-scores, kind="stable")]
    position = {int(i): r for r, i in enumerate(order)}
    return max(position[int(i)] for i in truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pool", type=Path)
    ap.add_argument("--exact-cache", type=Path, required=True, help="npz of exact scores to reuse or write")
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--within", type=int, default=3000)
    ap.add_argument("--rows", type=int, default=shared.TARGET_ROWS, help="held-out rows per target (as recall_sweep)")
    ap.add_argument("--only", nargs="*", default=None, help="only these targets (task names)")
    args = ap.parse_args()
    index = SourceIndex(args.pool, readonly=True)
    prefilter, out_dim = index.prefilter(), index.manifest["out_dim"]
    tasks = shared.targets(index, args.targets, rows=args.rows)
    ids, exact = shared.exact_scores(index, tasks, args.exact_cache)
    print("| target | FAISS k=32 | FAISS k=64 | approx k=32 | approx k=64 | refine k=32 | refine k=64 | refine k=128 |")
    print("|---|---|---|---|---|---|---|---|")
    for t, (name, x, y) in enumerate(tasks):
        if args.only and name not in args.only:
            continue
        view = TargetView(TargetStats.from_embeddings(x, y), pool=(index.probe, prefilter.mean))
        order = np.argsort(-exact[t])
        truth, near = ids[order[:5]], ids[order[:args.within]]
        row = []
        for k in (32, 64):
            found, scores = prefilter.search(view, index.probe, out_dim, len(ids), k)
            row.append(worst_rank(found, scores, truth))
        found, vecs = index.store.summaries(near)
        for k in (32, 64):
            row.append(worst_rank(found, approximate_scores(view, index.probe, vecs, out_dim, k), truth))
        refine = {k: [] for k in (32, 64, 128)}
        for start in range(0, len(near), 500):
            found, w, b = index.store.esms(near[start:start + 500])
            for k in refine:
                refine[k].append(refining_scores(view, w, b, k))
        row += [worst_rank(near, np.concatenate(v), truth) for v in refine.values()]
        print(f"| {name} | " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
