#!/usr/bin/env python3
"""Quality of the built pool: same-task retrieval, ESM fidelity, hubs, float16, approximate recall.

Same-task retrieval (the cheapest honest check that each ESM carries its task): every task's
held-out target rows (``common.split``, never fine-tuned or fitted on) are ranked against the
whole index with the default query, as a user's target would be; the task's own source should
come first. The three sample targets (indexes/samples) likewise, by their texts. Also by each
method alone (ESM-LogME, domain similarity), and for the combined ranking at several domain
weights (``--weights``: the sweep that chose ``domain.DOMAIN_WEIGHT``).

Each miss (a pool task's or a sample's) is then judged by LogME on the real fine-tuned
encoders of the own source and of the one ranked first (CACHE/models): is the miss the map's,
or the fine-tuning's?

Fidelity: for each of ``common.FIDELITY_TARGETS`` (held-out rows, n = 500) and every other
source, LogME on the real fine-tuned model's embeddings (fidelity.npz from build_pool.py)
against ESM-LogME on the base embeddings: Spearman, top-1 agreement, top-3 overlap. The
target's own task and its twins are left out of its source list (a target's own task is not
a transfer candidate, and including it would flatter the agreement).

Target labels are numbered densely (as a user's string labels are), so classes that happen to
be absent from a task's held-out rows do not add all-zero columns.

Without the build folders (``--pool``: the float32 maps and fidelity.npz, which only a full
build_pool.py run leaves), the same-task checks run on the index's own maps and the fidelity
and float16 checks are skipped.

Usage: python tools/eval_pool.py [--index indexes/default] [--pool CACHE/pool] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402


def main() -> None:
    import torch

    from esm_index.data import load_labelled
    from esm_index.domain import DOMAIN_WEIGHT, combine
    from esm_index.esm import ESM
    from esm_index.index import SourceIndex
    from esm_index.logme import TargetStats, logme, score_esms
    from esm_index.summary import TargetView, approximate_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=common.REPO / "indexes" / "default")
    ap.add_argument("--pool", type=Path, default=common.CACHE / "pool")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--weights", default="0,0.5,1,1.5,2,3,4,6,8,12,24,48",
                    help="domain weights to report same-task retrieval for (how DOMAIN_WEIGHT was chosen)")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",") if w]
    sweep: dict[float, list[int]] = {w: [] for w in weights}  # own-source rank per task, per weight

    index = SourceIndex(args.index, readonly=True)
    by_task = {m["task_id"]: m["name"] for _, m in index.store.iter_meta() if "task_id" in m}
    name_to_task = {v: k for k, v in by_task.items()}
    tasks = [t for t in common.task_ids() if t in by_task]

    # 1. Same-task retrieval through the product's own query path.
    def position(ranking, own: str) -> int:
        names = [name_to_task.get(r.source, r.source) for r in ranking.results]
        return names.index(own) + 1 if own in names else len(names) + 1

    # float16 (what the index serves) against float32 (the ESM folders), and how many of the
    # exact top-5 the approximate (summary) stage keeps in its top-k: on the same targets.
    sid = np.asarray([i for i, m in index.store.iter_meta() if m.get("task_id") in tasks])
    found, w16, b16 = index.store.esms(sid)
    order16 = [m["task_id"] for m in index.store.metas(found)]
    # The float32 maps and fidelity embeddings are in the build folders; without them (a
    # machine that only has the shipped index) the same-task checks run on the index's maps
    # and the float16 and fidelity checks are skipped.
    have_pool = all((args.pool / t / "fidelity.npz").is_file() for t in tasks)
    if have_pool:
        esms = {t: ESM.load(args.pool / t) for t in tasks}
        w = torch.from_numpy(np.stack([esms[t].weight for t in tasks]))
        b = torch.from_numpy(np.stack([esms[t].bias for t in tasks]))
    else:
        print(f"no build folders in {args.pool}: same-task checks on the index's maps; float16 and fidelity skipped")
        at = [order16.index(t) for t in tasks]
        w, b = torch.from_numpy(w16[at].astype(np.float32)), torch.from_numpy(b16[at].astype(np.float32))
    _, summaries = index.store.summaries(found)
    f16_same, f16_diff = 0, 0.0
    recall: dict[int, list[float]] = {k: [] for k in (5, 8, 10, 15)}
    same, winners = [], {}
    missed = []  # each miss, pool task or sample: texts, dense labels, own source, the one ranked first
    for tid in tasks:
        x, y = common.held_out_target(tid, index.embedder)
        ranking = index.rank_embeddings(x, y, "classification", top=len(index))
        by_method = {m: index.rank_embeddings(x, y, "classification", top=len(index), method=m)
                     for m in ("esm-logme", "domain")}
        alone = {m: position(r, tid) for m, r in by_method.items()}
        parts = by_method["esm-logme"].results  # each source's ESM-LogME and domain similarity
        names = np.asarray([name_to_task.get(r.source, r.source) for r in parts])
        for wt in weights:
            combined = combine([r.esm_logme for r in parts],
                               [np.nan if r.domain_similarity is None else r.domain_similarity for r in parts],
                               "combined", wt)
            sweep[wt].append(int(np.flatnonzero(names[np.argsort(-combined, kind="stable")] == tid)[0]) + 1)
        first = name_to_task.get(ranking.results[0].source)
        winners[first] = winners.get(first, 0) + 1
        stats = TargetStats.from_embeddings(x, y)
        s32 = dict(zip(tasks, score_esms(stats, w, b)))
        if have_pool:  # the index's float16 maps against the build folders' float32 ones
            s16 = dict(zip(order16, score_esms(stats, torch.from_numpy(w16), torch.from_numpy(b16))))
            f16_same += sorted(s32, key=s32.get)[-5:] == sorted(s16, key=s16.get)[-5:]
            f16_diff = max(f16_diff, max(abs(s32[t] - s16[t]) for t in tasks))
        else:  # w, b are the index's float16 maps already
            s16 = s32
        approx = dict(zip(order16, approximate_scores(TargetView(stats), index.probe, summaries,
                                                      index.manifest["out_dim"])))
        truth = set(sorted(s16, key=s16.get)[-5:])
        for k in recall:
            recall[k].append(len(truth & set(sorted(approx, key=approx.get)[-k:])) / 5)
        # Experiment: the same scores less each source's score for shuffled labels.
        adjusted = np.asarray([s32[t] for t in tasks]) - common.label_null_scores(x, y, w, b)
        esm_logme = dict(zip(names, (r.esm_logme for r in parts)))
        same.append({"target": tid, "n": len(y), "own_rank": position(ranking, tid), "top1": first,
                     "margin": ranking.results[0].score - ranking.results[1].score,
                     "esm_logme_own": esm_logme[tid], "esm_logme_top1": esm_logme[first],
                     "own_rank_esm_logme": alone["esm-logme"], "own_rank_domain": alone["domain"],
                     "own_rank_null_adjusted": int(1 + np.sum(adjusted > adjusted[tasks.index(tid)]))})
        if same[-1]["own_rank"] > 1:  # judged by the real models below
            data, _ = common.load_task(tid)
            missed.append({"target": tid, "own": tid, "first": first, "y": y, "esm_own": esm_logme[tid],
                           "esm_first": esm_logme[first],
                           "texts": [data.texts[i] for i in common.split(tid, len(data))[1]]})
        print(f"same-task {tid}: own source #{same[-1]['own_rank']} (top-1 {first}); ESM-LogME alone "
              f"#{alone['esm-logme']}, domain alone #{alone['domain']}; "
              f"null-adjusted #{same[-1]['own_rank_null_adjusted']}", flush=True)
    samples = []
    from prepare_tasks import SAMPLES

    for fname, own, _, _ in SAMPLES:
        target = load_labelled(common.SAMPLES / fname, ["text"], "label")
        ranking = index.rank(target.texts, target.labels, target.task, top=len(index))
        scores = {name_to_task.get(r.source): r.esm_logme for r in ranking.results}
        samples.append({"sample": fname, "own": own, "own_rank": position(ranking, own),
                        "top3": [name_to_task.get(r.source) for r in ranking.results[:3]],
                        "esm_logme_own": scores[own],
                        "esm_logme_top1": scores[name_to_task.get(ranking.results[0].source)],
                        **{f"own_rank_{m.replace('-', '_')}": position(index.rank(
                            target.texts, target.labels, target.task, top=len(index), method=m), own)
                           for m in ("esm-logme", "domain")}})
        print(f"sample {fname}: own source #{samples[-1]['own_rank']}", flush=True)
        if samples[-1]["own_rank"] > 1:
            missed.append({"target": fname, "own": own, "first": samples[-1]["top3"][0], "texts": target.texts,
                           "y": np.unique(target.labels, return_inverse=True)[1],
                           "esm_own": samples[-1]["esm_logme_own"], "esm_first": samples[-1]["esm_logme_top1"]})

    misses = real_logme_of_misses(index, missed)

    # 2. Fidelity: real fine-tuned embeddings vs ESM-LogME, n = 500 per target.
    fidelity = []
    for target in common.FIDELITY_TARGETS if have_pool else ():
        x, y = common.held_out_target(target, index.embedder)
        others = [i for i, s in enumerate(tasks) if not common.twins(s, target)]
        esm_scores = score_esms(TargetStats.from_embeddings(x, y), w, b)[others]
        real = np.asarray([logme(np.load(args.pool / tasks[i] / "fidelity.npz")[target].astype(np.float32), y)
                           for i in others])
        top = lambda s, k: {others[j] for j in np.argsort(-s)[:k]}  # noqa: E731
        fidelity.append({"target": target, "n": len(y), "spearman": common.spearman(real, esm_scores),
                         "top1_agree": top(real, 1) == top(esm_scores, 1),
                         "top3_overlap": len(top(real, 3) & top(esm_scores, 3)),
                         "real_top1": tasks[min(top(real, 1))], "esm_top1": tasks[min(top(esm_scores, 1))]})

    # Report.
    top1 = sum(s["own_rank"] == 1 for s in same)
    top3 = sum(s["own_rank"] <= 3 for s in same)
    print("\n| target (held-out rows) | n | own source rank | top-1 source | top-1 margin | rank by ESM-LogME alone "
          "| rank by domain alone |")
    print("|---|---|---|---|---|---|---|")
    for s in same:
        print(f"| {s['target']} | {s['n']} | {s['own_rank']} | {s['top1']} | {s['margin']:.3f} | "
              f"{s['own_rank_esm_logme']} | {s['own_rank_domain']} |")
    twin1 = sum(common.twins(s["target"], s["top1"]) for s in same)
    print(f"\nsame-task retrieval (default ranking): own source top-1 for {top1}/{len(same)} tasks "
          f"({top1 / len(same):.0%}; own source or its twin: {twin1}/{len(same)}), top-3 for {top3}/{len(same)}")
    for m in ("esm_logme", "domain"):
        r = [s[f"own_rank_{m}"] for s in same]
        print(f"  by {m} alone: top-1 {sum(v == 1 for v in r)}/{len(same)}, top-3 {sum(v <= 3 for v in r)}/{len(same)}")
    print(f"\n| domain weight (default {DOMAIN_WEIGHT:g}) | " + " | ".join(f"{w:g}" for w in weights) + " |")
    print("|---|" + "---|" * len(weights))
    print("| same-task top-1 | " + " | ".join(f"{sum(r == 1 for r in v)}/{len(v)}" for v in sweep.values()) + " |")
    print("| same-task top-3 | " + " | ".join(f"{sum(r <= 3 for r in v)}/{len(v)}" for v in sweep.values()) + " |")
    if misses:
        print("\nEach miss of the default ranking, judged by LogME on the real fine-tuned models (the same held-out rows):\n")
        print("| target | ranked first | ESM-LogME own / first | real LogME own / first | the real models agree with |")
        print("|---|---|---|---|---|")
        for m in misses:
            print(f"| {m['target']} | {m['first']} | {m['esm_own']:.4f} / {m['esm_first']:.4f} | "
                  f"{m['real_own']:.4f} / {m['real_first']:.4f} | "
                  f"{'the ranking' if m['real_first'] > m['real_own'] else 'the own task'} |")
    adj1 = sum(s["own_rank_null_adjusted"] == 1 for s in same)
    adj3 = sum(s["own_rank_null_adjusted"] <= 3 for s in same)
    print(f"with the shuffled-label null subtracted (experiment): top-1 {adj1}/{len(same)}, top-3 {adj3}/{len(same)}")
    print("samples: " + "; ".join(f"{s['sample']} -> own #{s['own_rank']} (top-3 {', '.join(s['top3'])}; "
                                  f"ESM-LogME alone #{s['own_rank_esm_logme']}, domain alone #{s['own_rank_domain']})"
                                  for s in samples))
    print("times ranked first: " + ", ".join(f"{k} {v}" for k, v in sorted(winners.items(), key=lambda kv: -kv[1])))
    if not have_pool:
        print("\nfidelity and float16 against float32: skipped (they need the build folders, --pool)")
    else:
        print_fidelity(fidelity, f16_same, f16_diff, len(tasks))
    print("\n| approximate-stage top-k | " + " | ".join(map(str, recall)) + " |")
    print("|---|" + "---|" * len(recall))
    print("| recall of exact top-5 (mean over targets) | " + " | ".join(f"{np.mean(v):.2f}" for v in recall.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"recall": {k: float(np.mean(v)) for k, v in recall.items()},
                                         "weight_sweep": {str(w): v for w, v in sweep.items()},
                                         "same_task": same, "misses_real": misses, "samples": samples, "winners": winners,
                                         "fidelity": fidelity, "float16_same_top5": f16_same if have_pool else None,
                                         "float16_max_diff": f16_diff if have_pool else None}, indent=1))


def print_fidelity(fidelity: list[dict], f16_same: int, f16_diff: float, n_tasks: int) -> None:
    """The fidelity table and the float16 check (both need the build folders)."""
    print("\n| fidelity target | n | Spearman (real vs ESM) | top-1 agrees | top-3 overlap | real top-1 | ESM top-1 |")
    print("|---|---|---|---|---|---|---|")
    for f in fidelity:
        print(f"| {f['target']} | {f['n']} | {f['spearman']:.2f} | {'yes' if f['top1_agree'] else 'no'} | "
              f"{f['top3_overlap']}/3 | {f['real_top1']} | {f['esm_top1']} |")
    agree = sum(f["top1_agree"] for f in fidelity)
    print(f"| **mean** | | **{np.mean([f['spearman'] for f in fidelity]):.2f}** | **{agree}/{len(fidelity)}** | "
          f"**{np.mean([f['top3_overlap'] for f in fidelity]):.2f}/3** | | |")
    print(f"\nfloat16 vs float32 ESMs, exact: same top-5 for {f16_same}/{n_tasks} targets, "
          f"largest score change {f16_diff:.2g}")


def real_logme_of_misses(index, missed: list[dict]) -> list[dict]:
    """For each miss (a pool task's held-out rows, or a sample, whose own source the default
    ranking does not put first): LogME of its texts on the real fine-tuned encoders
    (CACHE/models, kept by build_pool.py) of its own task and of the source ranked first.
    Where the real models also prefer the source ranked first, no better map could have fixed
    the miss: the fine-tuning decides it."""
    from transformers import AutoModel

    from esm_index.logme import logme

    out = []
    for m in missed:
        models = [common.CACHE / "models" / t for t in (m["own"], m["first"])]
        if not all((p / "config.json").is_file() for p in models):
            continue
        real = [logme(index.embedder.with_model(AutoModel.from_pretrained(p)).embed(m["texts"]), m["y"])
                for p in models]
        out.append({"target": m["target"], "first": m["first"], "esm_own": m["esm_own"],
                    "esm_first": m["esm_first"], "real_own": real[0], "real_first": real[1]})
        print(f"miss {m['target']}: first {m['first']}; real LogME own {real[0]:.4f}, first {real[1]:.4f}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
