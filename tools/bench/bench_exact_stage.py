#!/usr/bin/env python3
"""The exact stage of a query for a small target (n <= D: the kernel side), two ways, side by
side in one process on the same maps and target:

  * "torch Gram" (the code before session 6): K = R [W, b]^T and A = K K^T by batched torch
    matmuls in float64, then the compiled reduction of the Gram matrices
    (``TridiagonalTerms.from_grams``), then the fixed point;
  * "compiled" (``score_esms`` now): K by dtrmm + dgemm, A by dsyrk and the reduction, all in
    one compiled pass per source, parallel over sources (``_kernels.reduce_kernel_side``).

Both score the first ``--sources`` maps of ``--index`` for a sample target, inside
``one_blas_thread`` as a query does; prints the median seconds of ``--repeats`` runs each
(alternating), their ratio and the largest score difference.

Usage: python tools/bench/bench_exact_stage.py [--index /tmp/esm-serve-bench/pool-10000]
       [--target indexes/samples/movie_reviews.csv] [--sources 32] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from shared import REPO, SAMPLES

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from esm_index import logme as L
    from esm_index import spectrum as S
    from esm_index.index import SourceIndex
    from esm_index.tables import read_target

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=REPO / "indexes" / "default")
    ap.add_argument("--target", type=Path, default=SAMPLES / "movie_reviews.csv")
    ap.add_argument("--sources", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    index = SourceIndex(args.index, readonly=True)
    texts, columns = read_target(args.target, ["text"], ["label"])
    x = index.embed(texts)
    target = L.TargetStats.from_embeddings(x, np.unique(columns[0], return_inverse=True)[1])
    _, w, b = index.store.esms(index.store.ids()[:args.sources])
    w, b = torch.from_numpy(w), torch.from_numpy(b)
    if target.r.shape[0] > w.shape[1]:
        raise SystemExit(f"{len(texts)} rows: not a small target (the kernel side needs n <= {w.shape[1]})")

    def torch_gram() -> np.ndarray:
        terms = S.TridiagonalTerms.from_grams(*S.gram_and_rhs(target, w, b)[:2], target.yy)
        return L.fixed_point(terms, target.n, w.shape[1], loop=S.TORCH, weight=target.weight).numpy()

    def compiled() -> np.ndarray:
        return L.score_esms(target, w, b)

    seconds = {"torch Gram": [], "compiled": []}
    with L.one_blas_thread():
        scores = {name: fn() for name, fn in (("torch Gram", torch_gram), ("compiled", compiled))}  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("torch Gram", torch_gram), ("compiled", compiled)):
                t0 = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - t0)
    p50 = {k: float(np.median(v)) for k, v in seconds.items()}
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}; {len(w)} maps of {args.index}, target {args.target.name} (n={len(texts)})")
    for name, value in p50.items():
        print(f"{name:>10}: median {value:.4f} s over {args.repeats} runs")
    print(f"ratio {p50['torch Gram'] / p50['compiled']:.2f}x, largest score difference "
          f"{np.abs(scores['torch Gram'] - scores['compiled']).max():.1e}")


if __name__ == "__main__":
    main()
