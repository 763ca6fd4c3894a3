#!/usr/bin/env python3
"""The FAISS stage alone at pool sizes the disk cannot hold as ESMs (1M x 295 kB).

Takes a built pool (tools/bench/bench_query.py), reads the PCA coordinates its FAISS index holds,
and builds a FAISS index over N of them: the pool's own coordinates, then jittered copies
(Gaussian noise of 5 % of each coordinate's spread), assigned to the pool's K-means cells.
It times the FAISS stage of the default query (centroid scores + per-cell search) for real
targets and reports the process's peak RSS. The later stages read a fixed number of
summaries and maps from LMDB whatever N is, so they are not part of this measurement.

Usage: python tools/bench/bench_faiss_scale.py /tmp/esm-bench/pool-100000 --sizes 1000000
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

import shared
from esm_index.index import SourceIndex  # noqa: E402 - shared puts the checkout on sys.path
from esm_index.logme import TargetStats, one_blas_thread  # noqa: E402
from esm_index.prefilter import Prefilter, plan  # noqa: E402
from esm_index.summary import TargetView  # noqa: E402


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pool", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=None, help="default: plan(N).candidates")
    args = ap.parse_args()
    index = SourceIndex(args.pool, readonly=True)
    base = index.prefilter()
    coords = np.concatenate([c for _, c in base.cells()])
    spread = coords.std(0)
    views = [TargetView(TargetStats.from_embeddings(x, y)) for _, x, y in shared.targets(index, args.targets)]
    rng = np.random.default_rng(0)
    for n in args.sizes:
        quantizer = faiss.IndexFlatL2(coords.shape[1])
        quantizer.add(base.centroids)
        ivf = faiss.IndexIVFFlat(quantizer, coords.shape[1], base.ivf.nlist, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        for start in range(0, n, 100_000):
            count = min(100_000, n - start)
            chunk = coords[np.arange(start, start + count) % len(coords)]
            if start >= len(coords):
                chunk = chunk + (rng.standard_normal(chunk.shape) * 0.05 * spread).astype(np.float32)
            ivf.add_with_ids(np.ascontiguousarray(chunk), np.arange(start, start + count, dtype=np.int64))
        build = time.perf_counter() - t0
        scaled = Prefilter(base.generation, faiss.IndexPreTransform(faiss.downcast_VectorTransform(base.index.chain.at(0)), ivf),
                           base.mean, base.domain)
        directions = plan(n).directions[0]
        times = []
        for view in views:
            for _ in range(2):
                t0 = time.perf_counter()
                with one_blas_thread():  # as SourceIndex.rank_embeddings runs it
                    found, _ = scaled.search(view, index.probe, index.manifest["out_dim"],
                                             args.candidates or plan(n).candidates, directions)
                times.append(time.perf_counter() - t0)
        print({"sources": n, "cells": base.ivf.nlist, "directions": directions, "add_s": round(build, 1),
               "faiss_stage_p50_s": round(float(np.median(times)), 3), "p95_s": round(float(np.percentile(times, 95)), 3),
               "index_mb": round(n * (coords.shape[1] * 4 + 8) / 1e6, 1),
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}, flush=True)


if __name__ == "__main__":
    main()
