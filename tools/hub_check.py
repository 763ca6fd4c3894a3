#!/usr/bin/env python3
"""Experiment (issue 13, item 5): does a hub correction improve the rankings?

Some sources score high for almost any target ("hubs"): their fine-tuning moved the space a
lot, and LogME's evidence rewards movement. Cross-lingual retrieval meets the same problem
and answers it with CSLS, which subtracts each candidate's mean similarity to its
neighbourhood. The analogue here: each source's *hubness*, its mean standardised ESM-LogME
over a fixed set of reference targets,

    hub(s) = mean_r z_r(s),   z_r = ESM-LogME over the pool for reference target r, standardised

and the corrected ranking orders by  z_t(s) - lam * hub(s)  (ESM-LogME alone) or
z_t(s) - lam * hub(s) + DOMAIN_WEIGHT * z_t(domain)(s)  (the default combined ranking).
hub(s) is target-independent, so the product could store it with each source.

Reference targets: REF_ROWS seeded *source* rows of every pool task (never a held-out row).
To keep the test honest, hub(s) for a target leaves out the references of s's own task and
twins, and of the evaluated target's task and twins (the target's own task must not tell
the ranking which source fits it). Measured on the same-task check (held-out rows of every
pool task, as tools/eval_pool.py) and on the transfer ground truth (tools/transfer_bench.py's
runs, its targets' training parts, regret on seed-mean accuracy).

Usage: python tools/hub_check.py [--lambdas 0,0.25,0.5,1] [--ref-rows 200]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
import transfer_bench as tb  # noqa: E402
import transfer_report as tr  # noqa: E402
from esm_index.domain import DOMAIN_WEIGHT, standardise  # noqa: E402
from esm_index.index import SourceIndex  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default=str(common.REPO / "indexes" / "default"))
    ap.add_argument("--lambdas", type=lambda v: [float(x) for x in v.split(",")], default=[0, 0.25, 0.5, 1])
    ap.add_argument("--ref-rows", type=int, default=200, help="source rows per reference target")
    args = ap.parse_args()
    index = SourceIndex(args.index, readonly=True)
    tasks = common.task_ids()

    def scores(x, y) -> tuple[np.ndarray, np.ndarray]:
        """ESM-LogME and domain similarity of every pool source, in ``tasks`` order."""
        ranked = index.rank_embeddings(x, y, "classification", top=len(index), exact=True, method="esm-logme")
        by = {r.meta["task_id"]: (r.esm_logme, r.domain_similarity) for r in ranked.results}
        return np.array([by[t][0] for t in tasks]), np.array([by[t][1] for t in tasks])

    ref_z = {}
    for t in tasks:
        data, _ = common.load_task(t)
        src = common.source_rows(t, data)
        pick = np.sort(np.random.default_rng(1).choice(src, min(args.ref_rows, len(src)), replace=False))
        y = np.unique(data.labels[pick], return_inverse=True)[1]
        if y.max() > 0:
            ref_z[t] = standardise(scores(common.base_embeddings(index.embedder, [data.texts[i] for i in pick]), y)[0])

    def hub(target_task: str) -> np.ndarray:
        return np.array([np.mean([z[j] for r, z in ref_z.items()
                                  if not common.twins(r, s) and not common.twins(r, target_task)])
                         for j, s in enumerate(tasks)])

    def variants(esm: np.ndarray, dom: np.ndarray, hb: np.ndarray) -> dict[str, np.ndarray]:
        ze, zd = standardise(esm), standardise(dom)
        return {**{f"ESM-LogME, lam {lam:g}": ze - lam * hb for lam in args.lambdas},
                **{f"combined, lam {lam:g}": ze - lam * hb + DOMAIN_WEIGHT * zd for lam in args.lambdas}}

    place: dict[str, list[int]] = {}
    for t in tasks:
        x, y = common.held_out_target(t, index.embedder)
        for name, v in variants(*scores(x, y), hub(t)).items():
            place.setdefault(name, []).append(int(1 + np.sum(v > v[tasks.index(t)])))

    acc = tr.accuracies(tb.OUT)  # the probe-head runs (LP-FT), per seed in seed order
    regrets: dict[str, dict[int, list[float]]] = {}
    for target in tb.TARGETS:
        cands = [s for s in tb.candidates(target, 8) if len(acc.get((target, s), {})) >= 3]
        train, _ = tb.target_split(target, tb.load_target(target), 128)
        perf = {s: float(np.mean([acc[(target, s)][k] for k in range(3)])) for s in cands}
        own = tb.OWN.get(target, target.split(":", 1)[1])
        for name, v in variants(*scores(index.embed(train.texts), train.labels), hub(own)).items():
            score = dict(zip(tasks, v))
            order = sorted(cands, key=lambda s: -score[s])
            for k in (1, 3):
                regrets.setdefault(name, {1: [], 3: []})[k].append(tr.regret(perf, order, k))

    print(f"\n{len(ref_z)} reference targets of {args.ref_rows} source rows; {len(tasks)} same-task targets; "
          f"{len(regrets[next(iter(regrets))][1])} transfer targets\n")
    print("| ranking | same-task top-1 | top-3 | transfer regret@1 | regret@3 |")
    print("|---|---|---|---|---|")
    for name, p in place.items():
        p = np.array(p)
        print(f"| {name} | {np.sum(p == 1)}/{len(p)} | {np.sum(p <= 3)}/{len(p)} | "
              f"{np.mean(regrets[name][1]):.2f} | {np.mean(regrets[name][3]):.2f} |")
    whole = {s: np.mean([z[j] for r, z in ref_z.items() if not common.twins(r, s)]) for j, s in enumerate(tasks)}
    print("\nhub(s), every reference but the source's own: "
          + ", ".join(f"{s} {h:+.2f}" for s, h in sorted(whole.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
