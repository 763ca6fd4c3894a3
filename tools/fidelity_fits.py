#!/usr/bin/env python3
"""How much fidelity could a better map fit buy? ESM-LogME against LogME on the real
fine-tuned embeddings (as ``eval_pool.py`` measures it) for three kinds of map per source:

  shipped  the maps an index serves (``--index``; the shipped one; float16 there);
  others   leave-one-target-out: each source's map is fitted on its real fine-tuned
           embeddings of the OTHER fidelity targets' held-out rows (7 other kinds of text,
           3,500 texts, none of the target's), then scored on the left-out target;
  oracle   the map fitted on the target's own texts (in sample): the best a linear map can
           imitate the fine-tuned model on exactly these texts, i.e. a ceiling for any fit.

It needs only what ``build_pool.py`` kept (``fidelity.npz``: every fine-tuned model's
embeddings of the fidelity targets' held-out rows), no fine-tuning and no new embedding.

Usage: python tools/fidelity_fits.py [--kinds shipped others oracle] [--pool CACHE/pool]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
from esm_index.esm import fit_ridge  # noqa: E402
from esm_index.index import SourceIndex  # noqa: E402
from esm_index.logme import TargetStats, logme, score_esms  # noqa: E402

KINDS = ("shipped", "others", "oracle")


def maps(kind: str, target: str, sources: list[str], index: SourceIndex, base: dict, tuned: dict):
    """(weights, biases) of ``sources`` for ``target``, fitted the way ``kind`` says."""
    weights, biases = [], []
    for s in sources:
        if kind == "shipped":
            esm = index.get_esm(s)
        else:
            fit_on = [target] if kind == "oracle" else [u for u in common.FIDELITY_TARGETS if u != target]
            esm = fit_ridge(np.concatenate([base[u] for u in fit_on]),
                            np.concatenate([tuned[s][u].astype(np.float64) for u in fit_on]))
        weights.append(esm.weight)
        biases.append(esm.bias)
    return torch.from_numpy(np.stack(weights)), torch.from_numpy(np.stack(biases))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--pool", type=Path, default=common.CACHE / "pool", help="build_pool.py's output")
    ap.add_argument("--index", type=Path, default=common.REPO / "indexes" / "default")
    args = ap.parse_args()

    index = SourceIndex(args.index, readonly=True)
    tasks = common.task_ids()
    base, labels = {}, {}
    for t in common.FIDELITY_TARGETS:
        x, labels[t] = common.held_out_target(t, index.embedder)
        base[t] = x.astype(np.float64)
    tuned = {s: dict(np.load(args.pool / s / "fidelity.npz")) for s in tasks}

    rows = {k: [] for k in args.kinds}
    for t in common.FIDELITY_TARGETS:
        sources = [s for s in tasks if not common.twins(s, t)]
        real = np.asarray([logme(tuned[s][t].astype(np.float32), labels[t]) for s in sources])
        stats = TargetStats.from_embeddings(base[t].astype(np.float32), labels[t])
        for kind in args.kinds:
            rows[kind].append((t, *agreement(real, score_esms(stats, *maps(kind, t, sources, index, base, tuned)))))
            print(kind, *rows[kind][-1], flush=True)
    print_table("map fit", rows)


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, bool, int]:
    """Spearman, whether the top-1 is the same, and how many of the top 3 are shared."""
    top = lambda v, k: set(np.argsort(-v)[:k])  # noqa: E731
    return common.spearman(reference, other), top(reference, 1) == top(other, 1), len(top(reference, 3) & top(other, 3))


def print_table(what: str, rows: dict[str, list[tuple]]) -> None:
    """The markdown table BENCHMARKS.md §4 shows: one line per kind of comparison, per target
    its Spearman, then the means and counts; ``rows``: kind -> [(target, agreement...)]."""
    print(f"\n| {what} | " + " | ".join(common.FIDELITY_TARGETS) + " | mean Spearman | top-1 agrees | top-3 overlap |")
    print("|---|" + "---|" * (len(common.FIDELITY_TARGETS) + 3))
    for kind, r in rows.items():
        print(f"| {kind} | " + " | ".join(f"{x[1]:.2f}" for x in r) +
              f" | **{np.mean([x[1] for x in r]):.2f}** | {sum(x[2] for x in r)}/{len(r)} | {np.mean([x[3] for x in r]):.2f}/3 |")


if __name__ == "__main__":
    sys.exit(main())
