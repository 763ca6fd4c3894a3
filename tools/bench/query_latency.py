#!/usr/bin/env python3
"""Query latency and peak RSS of a fresh process that opens an existing index and runs the
default query for a few real targets (cached embeddings), as a long-lived service would.

Usage: python tools/bench/query_latency.py /tmp/esm-bench/pool-100000 [--targets 8] [--queries 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

import shared
from esm_index.index import SourceIndex  # noqa: E402 - shared puts the checkout on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--queries", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    index = SourceIndex(args.index, readonly=True)
    index.prefilter()
    open_s = time.perf_counter() - t0
    latencies, last = [], None
    for _, x, y in shared.targets(index, args.targets):
        for _ in range(args.queries):
            t0 = time.perf_counter()
            last = index.rank_embeddings(x, y, top=5)
            latencies.append(time.perf_counter() - t0)
    print(json.dumps({"sources": len(index), "open_and_load_faiss_s": round(open_s, 2),
                      "p50_s": round(float(np.percentile(latencies, 50)), 3),
                      "p95_s": round(float(np.percentile(latencies, 95)), 3), "timings_example": last.timings,
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    main()
