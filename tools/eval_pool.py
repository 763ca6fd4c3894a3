#!/usr/bin/env python3
"""Quality of the real pool: ESM fidelity, leave-one-out rankings, prefilter recall.

For each pool task as the target (its fixed probe sample from tools/build_pool.py) and
every other task as a source:
  * real:  LogME on the real fine-tuned model's embeddings of the target (probe_tuned.npy)
  * esm:   ESM-LogME, the source's ESM applied to the base embeddings
Fidelity per target: Spearman(real, esm) over the sources, and whether the top-1 / top-3
agree. Leave-one-out: each target's top-3 sources by ESM-LogME. Recall: how many of the
exact top-5 the approximate (summary) stage keeps in its top-k, on the real pool.

Writes markdown tables to stdout (for BENCHMARKS.md) and JSON to --json.
Usage: python tools/eval_pool.py [--index indexes/default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE = Path(os.environ.get("ESM_INDEX_CACHE", Path.home() / ".cache" / "esm-index"))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    import torch

    from esm_index.esm import ESM
    from esm_index.index import SourceIndex
    from esm_index.logme import TargetStats, logme, score_esms
    from esm_index.summary import TargetView, adapted_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=REPO / "indexes" / "default")
    ap.add_argument("--pool", type=Path, default=CACHE / "pool")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    order = json.loads((args.pool / "_probes" / "order.json").read_text())
    tasks = [t for t in order if (args.pool / t / "DONE").exists()]
    probes = {t: np.load(args.pool / "_probes" / f"{t}.npz") for t in tasks}
    esms = {t: ESM.load(args.pool / t) for t in tasks}
    tuned = {s: np.load(args.pool / s / "probe_tuned.npy").astype(np.float32) for s in tasks}
    w = torch.from_numpy(np.stack([esms[t].weight for t in tasks]))
    b = torch.from_numpy(np.stack([esms[t].bias for t in tasks]))
    index = SourceIndex(args.index, readonly=True)
    names = {m["task_id"]: i for i, m in index.store.iter_meta()}
    sid = np.asarray([names[t] for t in tasks])
    _, summaries = index.store.summaries(sid)
    _, w16, b16 = index.store.esms(sid)  # the float16 copies the index serves
    w16, b16 = torch.from_numpy(w16), torch.from_numpy(b16)
    f16_same_top5, f16_max_diff = 0, 0.0

    fidelity, loo, recall = [], [], {k: [] for k in (5, 8, 10, 15)}
    for ti, target in enumerate(tasks):
        x, y = probes[target]["base"], probes[target]["labels"]
        others = [i for i in range(len(tasks)) if i != ti]
        stats = TargetStats.from_embeddings(x, y)
        esm_scores = score_esms(stats, w, b)[others]
        half = score_esms(stats, w16, b16)[others]
        f16_same_top5 += set(np.argsort(-half)[:5]) == set(np.argsort(-esm_scores)[:5])
        f16_max_diff = max(f16_max_diff, float(np.abs(half - esm_scores).max()))
        real = np.asarray([logme(tuned[tasks[i]][order.index(target)], y) for i in others])
        top = lambda s, k: {others[j] for j in np.argsort(-s)[:k]}  # noqa: E731
        fidelity.append({"target": target, "spearman": spearman(real, esm_scores),
                         "top1_agree": top(real, 1) == top(esm_scores, 1),
                         "top3_overlap": len(top(real, 3) & top(esm_scores, 3)),
                         "real_top1": tasks[next(iter(top(real, 1)))], "esm_top1": tasks[next(iter(top(esm_scores, 1)))]})
        best = np.argsort(-esm_scores)[:3]
        loo.append({"target": target, "top3": [(tasks[others[j]], round(float(esm_scores[j]), 4)) for j in best]})
        approx = adapted_scores(TargetView(stats), index.probe, summaries[others], index.manifest["out_dim"])
        truth = top(esm_scores, 5)
        for k in recall:
            recall[k].append(len(truth & top(approx, k)) / 5)

    print("| target | Spearman (real vs ESM) | top-1 agrees | top-3 overlap | real top-1 | ESM top-1 |")
    print("|---|---|---|---|---|---|")
    for f in fidelity:
        print(f"| {f['target']} | {f['spearman']:.2f} | {'yes' if f['top1_agree'] else 'no'} | {f['top3_overlap']}/3 "
              f"| {f['real_top1']} | {f['esm_top1']} |")
    print(f"| **mean** | **{np.mean([f['spearman'] for f in fidelity]):.2f}** | "
          f"**{sum(f['top1_agree'] for f in fidelity)}/{len(fidelity)}** | "
          f"**{np.mean([f['top3_overlap'] for f in fidelity]):.2f}/3** | | |\n")
    print("| target | 1st | 2nd | 3rd |")
    print("|---|---|---|---|")
    for row in loo:
        print(f"| {row['target']} | " + " | ".join(f"{n} ({s:+.3f})" for n, s in row["top3"]) + " |")
    print(f"\nfloat16 vs float32 ESMs, exact mode: same top-5 set for {f16_same_top5}/{len(tasks)} targets, "
          f"largest score change {f16_max_diff:.2g}\n")
    print("| approximate-stage top-k | 5 | 8 | 10 | 15 |")
    print("|---|---|---|---|---|")
    print("| recall of exact top-5 (mean over targets) | " + " | ".join(f"{np.mean(v):.2f}" for v in recall.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"fidelity": fidelity, "loo": loo,
                                         "recall": {k: float(np.mean(v)) for k, v in recall.items()},
                                         "float16_same_top5": f16_same_top5, "float16_max_diff": f16_max_diff}, indent=1))


if __name__ == "__main__":
    main()
