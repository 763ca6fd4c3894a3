#!/usr/bin/env python3
"""Scoring speed: esm-index vs hfselect, side by side in one process, same ESMs and target
embeddings; prints seconds, the ratio and the largest score difference.

hfselect's side is exactly what ``hfselect.esm_logme.compute_scores`` does after embedding:
every ESM (its own nn.Linear module) maps the embeddings in float32 batches of 128, then
``hfselect.logme.LogME.fit`` scores each mapped set (numba compile excluded, reported apart).
Our side is ``TargetStats.from_embeddings`` + ``score_esms`` (QR once, then per source a
Gram matrix and a tridiagonalisation on a CPU / batched eigh on a GPU).

Targets: real MiniLM embeddings of the shipped sample texts (movie reviews + SMS: 4 classes),
resampled with small noise to n rows. At d=768 (no such model offline) the target is
synthetic: a decaying spectrum plus an exact linear relation like LayerNorm's. ESMs are
near-identity maps (the cost does not depend on their values).

Usage: python tools/bench/bench_scoring.py [--sources 500] [--configs 384:1000 384:5000 768:1000]
       [--no-hfselect] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from shared import CACHE, sample_texts
from esm_index.logme import TargetStats, score_esms  # noqa: E402 - shared puts the checkout on sys.path


def real_target(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows resampled (with 1% noise) from MiniLM embeddings of the sample targets."""
    from esm_index.embed import Embedder

    cache = CACHE / "bench_target.npz"
    if cache.exists():
        data = np.load(cache)
        x, y = data["x"], data["y"]
    else:
        texts, labels = sample_texts()
        x, y = Embedder().embed(texts), np.asarray(labels)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=x, y=y)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), n)
    noise = 0.01 * rng.standard_normal((n, x.shape[1])) * x.std(0)
    return (x[idx] + noise).astype(np.float32), y[idx]


def synthetic_target(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((d, d)) * (np.arange(1, d + 1) ** -0.7)[:, None]
    x = rng.standard_normal((n, d)) @ basis + rng.standard_normal(d) * 0.3
    x[:, 0] = 1.0 - x[:, 1:].sum(1) / d  # an exact linear relation, like LayerNorm's
    y = (x[:, 1:5] @ rng.standard_normal(4) > 0).astype(int) + 2 * (x[:, 6] > np.median(x[:, 6]))
    return x.astype(np.float32), y


def make_esms(count: int, d: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = np.eye(d, dtype=np.float32) + (rng.standard_normal((count, d, d)) * 0.05).astype(np.float32)
    return w, (rng.standard_normal((count, d)) * 0.05).astype(np.float32)


def hfselect_scores(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    from hfselect.esm import ESM as HfESM
    from hfselect.logme import LogME

    t0 = time.perf_counter()
    LogME().fit(np.random.default_rng(0).standard_normal((50, 8)), np.arange(50) % 2)  # numba compile
    compile_s = time.perf_counter() - t0
    esms = []
    for i in range(len(w)):
        esm = HfESM(architecture="linear", embedding_dim=x.shape[1])
        with torch.no_grad():
            esm.model.weight.copy_(torch.from_numpy(w[i]))
            esm.model.bias.copy_(torch.from_numpy(b[i]))
        esms.append(esm)
    xt = torch.from_numpy(x)
    t0 = time.perf_counter()
    mapped = [[] for _ in esms]
    with torch.no_grad():
        for start in range(0, len(x), 128):
            batch = xt[start:start + 128]
            for i, esm in enumerate(esms):
                mapped[i].append(esm(batch).cpu().numpy())
    t1 = time.perf_counter()
    scores = np.asarray([LogME(regression=False).fit(np.vstack(m), y, add_intercept=False) for m in mapped])
    t2 = time.perf_counter()
    return scores, t1 - t0, t2 - t1, compile_s


def ours(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, device: str) -> tuple[np.ndarray, float]:
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    if device == "cuda":
        wt, bt = wt.cuda(), bt.cuda()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    target = TargetStats.from_embeddings(x, y, device=device)
    scores = score_esms(target, wt, bt)
    if device == "cuda":
        torch.cuda.synchronize()
    return scores, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=500)
    ap.add_argument("--configs", nargs="+", default=["384:1000", "384:5000", "768:1000"], help="d:n pairs")
    ap.add_argument("--no-hfselect", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="our side: best of this many runs")
    ap.add_argument("--synthetic", action="store_true", help="synthetic targets at every d (no model needed)")
    ap.add_argument("--linalg", choices=["default", "cusolver", "magma"], default="default",
                    help="torch's CUDA linear-algebra backend")
    args = ap.parse_args()
    if args.linalg != "default":
        torch.backends.cuda.preferred_linalg_library(args.linalg)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()}, linalg {args.linalg})" if args.device == "cuda" else ""), flush=True)
    print("| d | n | sources | hfselect s (map + LogME) | esm-index s | ratio | per source ms (ours) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for config in args.configs:
        d, n = map(int, config.split(":"))
        x, y = real_target(n) if d == 384 and not args.synthetic else synthetic_target(n, d)
        w, b = make_esms(args.sources, d)
        ours(x[:500], y[:500], w[:2], b[:2], args.device)  # warm-up: numba cache / CUDA context
        our_scores, our_s = min((ours(x, y, w, b, args.device) for _ in range(args.repeats)), key=lambda r: r[1])
        row = {"d": d, "n": n, "sources": args.sources, "ours_s": round(our_s, 3),
               "ours_ms_per_source": round(1e3 * our_s / args.sources, 3)}
        if not args.no_hfselect:
            ref, map_s, logme_s, compile_s = hfselect_scores(x, y, w, b)
            row.update({"hfselect_s": round(map_s + logme_s, 3), "hfselect_map_s": round(map_s, 3),
                        "hfselect_logme_s": round(logme_s, 3), "numba_compile_s": round(compile_s, 2),
                        "ratio": round((map_s + logme_s) / our_s, 2),
                        "max_abs_diff": float(np.abs(ref - our_scores).max())})
        rows.append(row)
        print(f"| {d} | {n} | {args.sources} | {row.get('hfselect_s', '-')} "
              f"({row.get('hfselect_map_s', '-')} + {row.get('hfselect_logme_s', '-')}) | {row['ours_s']} | "
              f"{row.get('ratio', '-')}x | {row['ours_ms_per_source']} | {row.get('max_abs_diff', '-'):.2g} |"
              if "max_abs_diff" in row else
              f"| {d} | {n} | {args.sources} | - | {row['ours_s']} | - | {row['ours_ms_per_source']} | - |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
