#!/usr/bin/env python3
"""Which of two pools to ship: the accuracy a user gets by following each one's ranking.

Regret is relative to each pool's own best source, so it cannot compare pools whose sources
were fine-tuned differently (a 100-step and a 300-step build): their "best" are different
models. What a user gets can be compared: for each target of ``transfer_bench.TARGETS`` that
both pools' transfer runs cover, the test accuracy after intermediate training on the first
source of the pool's default ranking ("top-1"), and on the best of its first three ("top-3":
the user tries three), on the same 8 candidates and the same target split; beside it the
target alone ("none", which does not depend on the pool) and the pool's best candidate.
Rankings use the target's training part only, as in ``transfer_bench.py --report``.

Differences are paired on targets and seeds: B - A on seed-mean accuracy, the sd over seeds
of the same difference computed from each seed alone, and a bootstrap over targets.

Usage: python tools/compare_pools.py RUNS_A INDEX_A RUNS_B INDEX_B [--names "100 steps,300 steps"] [--head random]
(session 11's comparison was made on random-head runs: --head random reproduces it)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transfer_bench import TARGETS, candidates, load_target, target_split  # noqa: E402
from transfer_report import accuracies  # noqa: E402


def default_order(index, x: np.ndarray, labels: np.ndarray, cands: list[str]) -> list[str]:
    ranked = index.rank_embeddings(x, labels, "classification", top=len(index), exact=True)
    score = {r.meta.get("task_id", r.source): r.score for r in ranked.results}
    return sorted(cands, key=lambda s: -score[s])


def main() -> None:
    from esm_index.index import SourceIndex

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs_a", type=Path)
    ap.add_argument("index_a", type=Path)
    ap.add_argument("runs_b", type=Path)
    ap.add_argument("index_b", type=Path)
    ap.add_argument("--names", default="A,B")
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--head", choices=("probe", "random"), default="probe",
                    help="which runs to read: the target head's start (transfer_bench.py --head)")
    ap.add_argument("--truth", choices=("acc", "probe_acc"), default="acc",
                    help="accuracy after fine-tuning, or the probe's (--probe-only runs: with --seeds 1)")
    args = ap.parse_args()
    names = args.names.split(",")
    accs = [accuracies(runs, args.head, args.truth) for runs in (args.runs_a, args.runs_b)]
    indexes = [SourceIndex(args.index_a, readonly=True), SourceIndex(args.index_b, readonly=True)]

    def complete(acc, target, cands):
        return all(len(acc.get((target, s), [])) >= args.seeds for s in ["none", *cands])

    # rows[target] = {(pool, what): per-seed accuracies}, what in none / top-1 / top-3 / best
    rows: dict[str, dict[tuple[int, str], np.ndarray]] = {}
    for target in TARGETS:
        cands = candidates(target, args.sources)
        if not all(complete(acc, target, cands) for acc in accs):
            continue
        train, _ = target_split(target, load_target(target), args.train)
        x = indexes[0].embed(train.texts)  # the same base model and pooling in both pools
        row = {}
        for p, (acc, index) in enumerate(zip(accs, indexes)):
            per_seed = {s: np.asarray(acc[(target, s)][:args.seeds]) for s in ["none", *cands]}
            mean = {s: v.mean() for s, v in per_seed.items()}
            order = default_order(index, x, train.labels, cands)
            best3 = max(order[:3], key=mean.get)  # the user keeps the best of the three tried
            row[(p, "none")] = per_seed["none"]
            row[(p, "top-1")] = per_seed[order[0]]
            row[(p, "top-3")] = per_seed[best3]
            row[(p, "best")] = per_seed[max(cands, key=mean.get)]
        rows[target] = row
        print(f"{target}: " + "; ".join(f"{names[p]} top-1 {row[(p, 'top-1')].mean():.3f}, top-3 "
                                       f"{row[(p, 'top-3')].mean():.3f}, best {row[(p, 'best')].mean():.3f}"
                                       for p in (0, 1)), flush=True)
    targets = list(rows)
    print(f"\n{len(targets)} targets, {args.sources} candidate sources each, {args.seeds} seeds: mean test accuracy\n")
    print("| pool | target alone | default's top-1 | best of default's top-3 | best candidate |")
    print("|---|---|---|---|---|")
    for p in (0, 1):
        cells = [np.mean([rows[t][(p, w)].mean() for t in targets]) for w in ("none", "top-1", "top-3", "best")]
        print(f"| {names[p]} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(targets), size=(10000, len(targets)))
    print(f"\n| {names[1]} minus {names[0]} | delta | seed sd | 95% CI over targets | wins/ties/losses |")
    print("|---|---|---|---|---|")
    for what in ("none", "top-1", "top-3", "best"):
        d = np.stack([rows[t][(1, what)] - rows[t][(0, what)] for t in targets])  # targets x seeds
        per_target = d.mean(1)
        lo, hi = np.percentile(per_target[picks].mean(1), [2.5, 97.5])
        print(f"| {what} | {per_target.mean():+.4f} | {np.std(d.mean(0)):.4f} | [{lo:+.4f}, {hi:+.4f}] | "
              f"{np.sum(per_target > 1e-9)}/{np.sum(np.abs(per_target) <= 1e-9)}/{np.sum(per_target < -1e-9)} |")


if __name__ == "__main__":
    main()
