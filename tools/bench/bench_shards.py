#!/usr/bin/env python3
"""A sharded pool on local Ray: query latency with 1, 2 and 4 workers, beside the same pool
unsharded and the shards queried in this process, in one run (issue 12, item 4).

Builds (or reuses) a synthetic pool of N sources (``shared.grow_pool``: mixtures of the
shipped pool's real maps), splits it into S shards (``ShardedIndex.split``), and times the
default query (prefilter + exact rerank of the shortlist, method "combined") for real targets
(``shared.targets``: held-out rows of prepared tasks, their base embeddings cached on disk,
so no time goes to the base model). Every configuration is warmed by one query per target
first (FAISS files loaded, kernels compiled, Ray actors started and holding their shards
open); the first query's wall clock, actor start-up included, is reported apart. What is
timed is ``rank_embeddings`` in the driver: sending the target, the shards' work, the merge.

It also reports, per configuration, how many sources were scored exactly and the recall of
each target's exact top-10 (an exact scan, cached in ROOT/exact-N.npz): each shard passes its
own candidates, refine and shortlist on, so a sharded default query passes S times as many
sources through each stage as one index does; the unsharded query with stages S times as
wide (CANDIDATES/REFINE/SHORTLIST) is run beside it for that reason. With ``--exact``, the exact-mode top-10
of the sharded query is compared with the unsharded one (needs ~2.3 GB per 1,000 sources in
the largest process; keep N small).

Usage: python tools/bench/bench_shards.py --sources 4000 --shards 4 --workers 1 2 4 --root /tmp/esm-bench-shards
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

import shared
from esm_index.index import SourceIndex  # noqa: E402 - shared puts the checkout on sys.path
from esm_index.prefilter import plan  # noqa: E402
from esm_index.results import DEFAULT_SHORTLIST  # noqa: E402
from esm_index.ray_shards import kernel_threads  # noqa: E402
from esm_index.shards import ShardedIndex, is_sharded  # noqa: E402


def timed(index, tasks: list, queries: int, **options) -> dict:
    """First query per target (warm-up) apart, then ``queries`` timed rounds over the targets."""
    t0 = time.perf_counter()
    for _, x, y in tasks:
        index.rank_embeddings(x, y, top=10, **options)
    first = time.perf_counter() - t0
    latencies, rankings = [], []
    for _ in range(queries):
        for _, x, y in tasks:
            t0 = time.perf_counter()
            rankings.append(index.rank_embeddings(x, y, top=10, **options))
            latencies.append(time.perf_counter() - t0)
    return {"warm_up_s": round(first, 2), "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p95_s": round(float(np.percentile(latencies, 95)), 3), "rankings": rankings[-len(tasks):]}


def recall(rankings: list, truth: list) -> float:
    """Mean share of each target's exact top-10 by ESM-LogME (the synthetic sources have no
    domain vectors, so "combined" orders by ESM-LogME) that its ranking returns."""
    return round(float(np.mean([len({r.source for r in a.results} & set(t)) / 10 for a, t in zip(rankings, truth)])), 3)


def overlap(rankings: list, reference: list) -> float:
    """Mean share of the reference top-10 that each ranking returns."""
    return float(np.mean([len({r.source for r in a.results} & {r.source for r in b.results}) / len(b.results)
                          for a, b in zip(rankings, reference)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=4000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--queries", type=int, default=5, help="timed rounds over the targets")
    ap.add_argument("--exact", action="store_true", help="exact mode instead of the default query")
    ap.add_argument("--threads", type=int, default=1,
                    help="kernel threads of the driver and of each actor (0: the library's default)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/esm-bench-shards"))
    args = ap.parse_args()
    import ray

    if args.threads:
        kernel_threads(args.threads)

    pool, sharded_dir = args.root / f"pool-{args.sources}", args.root / f"pool-{args.sources}-{args.shards}shards"
    added, seconds = shared.grow_pool(pool, args.sources)
    with SourceIndex(pool) as whole:
        whole.rebuild()
    if not is_sharded(sharded_dir):
        t0 = time.perf_counter()
        ShardedIndex.split(pool, sharded_dir, args.shards).close()
        print(json.dumps({"split_s": round(time.perf_counter() - t0, 1)}), flush=True)
    options = {"exact": True} if args.exact else {}
    rows = []
    with SourceIndex(pool, readonly=True) as whole:
        tasks = shared.targets(whole, args.targets)
        ids, exact = shared.exact_scores(whole, tasks, args.root / f"exact-{args.sources}.npz")
        names = {i: m["name"] for i, m in whole.store.iter_meta()}
        truth = [[names[int(i)] for i in ids[np.argsort(-row)[:10]]] for row in exact]
        base = timed(whole, tasks, args.queries, **options)
        rows.append({"config": "unsharded", **{k: v for k, v in base.items() if k != "rankings"},
                     "scored": scored(whole, tasks, **options), "recall10": recall(base["rankings"], truth)})
        print(json.dumps(rows[-1]), flush=True)
        if not args.exact:  # every stage as wide as the shards' stages together
            stages = plan(args.sources // args.shards)
            wide = {"candidates": stages.candidates * args.shards, "refine": stages.refine * args.shards,
                    "shortlist": DEFAULT_SHORTLIST * args.shards}
            run = timed(whole, tasks, args.queries, **wide)
            rows.append({"config": "unsharded, {candidates}/{refine}/{shortlist}".format(**wide),
                         **{k: v for k, v in run.items() if k != "rankings"}, "scored": scored(whole, tasks, **wide),
                         "recall10": recall(run["rankings"], truth)})
            print(json.dumps(rows[-1]), flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for workers in [0, *args.workers]:
        t0 = time.perf_counter()
        with ShardedIndex(sharded_dir, readonly=True, workers=workers, threads=args.threads or None) as index:
            opened = time.perf_counter() - t0
            run = timed(index, tasks, args.queries, **options)
            count = scored(index, tasks, **options) if workers == 0 else rows[-1]["scored"]
        name = "in-process" if workers == 0 else f"ray, {workers} worker{'s' * (workers > 1)}"
        rows.append({"config": f"{args.shards} shards, {name}", "open_s": round(opened, 2),
                     **{k: v for k, v in run.items() if k != "rankings"}, "scored": count,
                     "recall10": recall(run["rankings"], truth),
                     "top10_overlap_with_unsharded": round(overlap(run["rankings"], base["rankings"]), 3),
                     "same_top10_scores": _same(run["rankings"], base["rankings"])})
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    print(json.dumps({"sources": args.sources, "shards": args.shards, "mode": "exact" if args.exact else "default",
                      "targets": [t[0] for t in tasks], "rows_per_target": len(tasks[0][1]), "cores": os.cpu_count(),
                      "threads": args.threads, "load_average": os.getloadavg(),
                      "import_esms_per_s": round(added / seconds, 1) if added else None,
                      "driver_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))
    print("\n| configuration | p50 s | p95 s | first round s | sources scored exactly | recall of the exact top-10 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['p50_s']} | {r['p95_s']} | {r['warm_up_s']} | {r['scored']} | {r['recall10']} |")


def scored(index, tasks: list, **options) -> float:
    """Mean number of sources a query scores exactly (untimed; in this process): the
    shortlist plus the nearest domains, per shard for a sharded index."""
    from esm_index import query as query_path
    from esm_index.results import Query
    from esm_index.shard_query import score_shard

    query, counts = Query(top=10, **options), []
    for _, x, y in tasks:
        x, y, *_ = query_path.check_input(index.manifest["dim"], x, y, "classification", query)
        if isinstance(index, ShardedIndex):
            counts.append(sum(len(score_shard(s, x, y, "classification", query).names) for s in index.shards))
        else:
            counts.append(len(query_path.score(index, x, y, "classification", query).found.ids))
    return round(float(np.mean(counts)), 1)


def _same(rankings: list, reference: list) -> bool:
    """Same top-10 sources in the same order with ESM-LogME equal to 1e-12 (relative)."""
    return all([r.source for r in a.results] == [r.source for r in b.results]
               and np.allclose([r.esm_logme for r in a.results], [r.esm_logme for r in b.results], rtol=1e-12, atol=0)
               for a, b in zip(rankings, reference))


if __name__ == "__main__":
    main()
