#!/usr/bin/env python3
"""The report half of tools/transfer_bench.py: how well each ranking picks the sources that
transferred best, from the runs that ``transfer_bench.py`` wrote (``transfer_bench.py
--report`` calls ``report``; the options are that script's).

For each target with complete runs it scores rankings of the candidates, all computed from
the target's training part only (``rankings``, cached per target by ``cached_rankings``):
the index's three methods (the default, ESM-LogME alone, domain similarity alone), LogME on
the real fine-tuned models' embeddings, the experiments (ridge leave-one-out accuracy on the
mapped and on the real embeddings, a shuffled-label null, the default at other domain
weights and at the weight chosen on the other targets), and random (its expectation,
exactly). Metrics: regret@k = (best - best of the top k) / best in %, the paper's
definition, on seed-mean accuracy; NDCG@5 with each source's gain over the worst candidate
as its relevance; seed noise as the sd over seeds of each figure computed per seed; paired
differences against the default with a bootstrap over targets. Then: whether any score
predicts that a source helps at all (``print_gains``), and how far the ground truth agrees
with itself on other test rows (``reliability``).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np

import common
from esm_index.domain import DOMAIN_WEIGHT  # the default ranking's weight
from transfer_bench import GROUPS, SOURCES, TARGETS, candidates, load_target, target_split

DEFAULT = "esm-index (default: combined)"  # the report's name for the index's default ranking


def regret(perf: dict[str, float], ranking: list[str], k: int) -> float:
    best = max(perf.values())
    return 100 * (best - max(perf[s] for s in ranking[:k])) / best


def random_regret(perf: dict[str, float], k: int) -> float:
    """Expected regret@k of a uniformly random ranking: over all k-subsets, exactly."""
    vals = sorted(perf.values())
    m, best = len(vals), vals[-1]
    # P(the subset's maximum is vals[i]) = C(i, k-1) / C(m, k)
    return sum(100 * (best - v) / best * math.comb(i, k - 1) / math.comb(m, k) for i, v in enumerate(vals))


def ndcg(perf: dict[str, float], ranking: list[str], k: int = 5) -> float:
    low = min(perf.values())
    rel = {s: perf[s] - low for s in perf}
    dcg = sum(rel[s] / math.log2(i + 2) for i, s in enumerate(ranking[:k]))
    ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(rel.values(), reverse=True)[:k]))
    return dcg / ideal if ideal > 0 else 1.0


def random_ndcg(perf: dict[str, float], k: int = 5) -> float:
    """Expected NDCG@k of a random ranking: each source sits at each place with equal chance."""
    low, m = min(perf.values()), len(perf)
    rel = sorted((perf[s] - low for s in perf), reverse=True)
    ideal = sum(r / math.log2(i + 2) for i, r in enumerate(rel[:k]))
    expected = sum(rel) / m * sum(1 / math.log2(i + 2) for i in range(min(k, m)))
    return expected / ideal if ideal > 0 else 1.0


RANKINGS_VERSION = 2  # bump when ``rankings`` changes what it computes


def cached_rankings(target: str, cands: list[str], args) -> tuple[dict, dict]:
    """Each ranking of ``cands`` and each predicted gain (``rankings``), kept in
    CACHE/transfer/rankings (a JSON file per target, index and training size): they take half
    a minute a target and do not depend on the ground truth, so reporting the same study on
    another truth, --seeds or --sources reuses them. They are computed for all of a target's
    candidates and cut down to ``cands``: every ranking orders sources by a score of each
    source alone, so the order of a subset is the cut-down order. The combined rankings (the
    default, at ``DOMAIN_WEIGHT``, and at each of ``args.weights``) are derived here from the
    kept ESM-LogME and domain similarity of every source, so neither the weights nor the
    default weight is part of the cache key."""
    every = candidates(target, len(SOURCES))
    stamp = max(f.stat().st_mtime_ns for f in args.index.iterdir())
    key = json.dumps([target, every, str(args.index.resolve()), stamp, args.train, RANKINGS_VERSION])
    path = common.CACHE / "transfer" / "rankings" / f"{zlib.crc32(key.encode()):08x}.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    if kept.get("key") != key:
        orders, parts, gains = rankings(target, every, args)
        kept = {"key": key, "orders": orders, "parts": parts, "gains": gains}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kept))
    return ({DEFAULT: combined_order(kept["parts"], cands, DOMAIN_WEIGHT),
             **{m: [s for s in order if s in cands] for m, order in kept["orders"].items()},
             **{f"combined, domain weight {wt:g}": combined_order(kept["parts"], cands, wt) for wt in args.weights}},
            {e: {s: g[s] for s in cands} for e, g in kept["gains"].items()})


def combined_order(parts: dict[str, list], cands: list[str], weight: float) -> list[str]:
    """``cands`` in the order of the index's combined ranking at domain ``weight``: its
    ``domain.combine`` of every source's ESM-LogME and domain similarity (standardised over
    all the sources the index scored, as a query does), cut down to ``cands``."""
    from esm_index.domain import combine

    score = dict(zip(parts["names"], combine(parts["esm_logme"], parts["domain"], "combined", weight)))
    return sorted(cands, key=lambda s: -score[s])


def rankings(target: str, cands: list[str], args) -> tuple[dict[str, list[str]], dict[str, list], dict]:
    """From the target's training part only: each weight-free method's order of ``cands``;
    every indexed source's ESM-LogME and domain similarity (``parts``, what the combined
    rankings are made of); and, for the scores that have a no-source counterpart, each
    source's predicted gain over the base model (its score minus the same score on the base
    embeddings)."""
    import torch
    from transformers import AutoModel

    from esm_index.index import SourceIndex
    from esm_index.logme import logme

    train, _ = target_split(target, load_target(target), args.train)
    index = SourceIndex(args.index, readonly=True)
    x = index.embed(train.texts)
    product = {}
    for method in ("esm-logme", "domain"):
        ranked = index.rank_embeddings(x, train.labels, "classification", top=len(index), exact=True, method=method)
        score = {r.meta.get("task_id", r.source): r.score for r in ranked.results}
        product[method] = sorted(cands, key=lambda s: -score[s])
    by_task = {r.meta.get("task_id", r.source): r.esm_logme for r in ranked.results}
    parts = {"names": [r.meta.get("task_id", r.source) for r in ranked.results],
             "esm_logme": [r.esm_logme for r in ranked.results],
             "domain": [np.nan if r.domain_similarity is None else r.domain_similarity for r in ranked.results]}
    source_of = {r.meta.get("task_id", r.source): r.source for r in ranked.results}
    esms = {s: index.get_esm(source_of[s]) for s in cands}  # the maps the rankings used
    w = torch.from_numpy(np.stack([esms[s].weight for s in cands]))
    b = torch.from_numpy(np.stack([esms[s].bias for s in cands]))
    null = dict(zip(cands, common.label_null_scores(x, train.labels, w, b)))
    real, real_loo, mapped_loo = {}, {}, {}
    for s in cands:
        tuned = index.embedder.with_model(AutoModel.from_pretrained(common.CACHE / "models" / s))
        feats = tuned.embed(train.texts)
        real[s] = logme(feats, train.labels)
        real_loo[s] = ridge_loo_accuracy(feats, train.labels)
        mapped_loo[s] = ridge_loo_accuracy(esms[s].apply(x), train.labels)
    base_logme, base_loo = logme(x, train.labels), ridge_loo_accuracy(x, train.labels)[0]
    gains = {"ESM-LogME - base LogME": {s: by_task[s] - base_logme for s in cands},
             "ridge LOO accuracy: ESM-mapped - base": {s: mapped_loo[s][0] - base_loo for s in cands},
             "ridge LOO accuracy: fine-tuned - base": {s: real_loo[s][0] - base_loo for s in cands}}
    return {"ESM-LogME (esm-logme)": product["esm-logme"],
            "ESM-LogME minus shuffled-label null": sorted(cands, key=lambda s: null[s] - by_task[s]),
            "LogME (fine-tuned)": sorted(cands, key=lambda s: -real[s]),
            "ridge LOO accuracy (ESM-mapped)": sorted(cands, key=lambda s: mapped_loo[s], reverse=True),
            "ridge LOO accuracy (fine-tuned)": sorted(cands, key=lambda s: real_loo[s], reverse=True),
            "domain similarity (domain)": product["domain"]}, parts, gains


def ridge_loo_accuracy(x: np.ndarray, labels: np.ndarray,
                       shrink: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)) -> tuple[float, float]:
    """Leave-one-out accuracy of a ridge classifier (one-hot least squares with an intercept)
    on ``x``, in closed form: an experiment beside LogME, which scores the evidence of the same
    linear model, while the ground truth is a linear probe's accuracy.

    With the centred features' SVD Xc = U S V^T, the hat matrix at ridge lam is
    H = 11^T/n + U diag(s^2/(s^2+lam)) U^T, and the prediction without row i is
    y_i - (y_i - (HY)_i) / (1 - h_ii). lam = c * mean(s^2) for c in ``shrink``, the one with
    the least leave-one-out squared error (PRESS). Returns (accuracy, -PRESS/n), so that sorting
    breaks accuracy's many ties (it moves in steps of 1/n) by the squared error."""
    x = np.asarray(x, np.float64)
    n = len(x)
    y = np.eye(int(labels.max()) + 1)[labels]
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    uty = u.T @ (y - y.mean(0))
    best = None
    for c in shrink:
        f = s**2 / (s**2 + c * np.mean(s**2))
        fit = y.mean(0) + u @ (f[:, None] * uty)
        h = 1 / n + (u**2) @ f
        loo = y - (y - fit) / (1 - h)[:, None]
        press = float(((y - loo) ** 2).sum()) / n
        if best is None or press < best[1]:
            best = (float((loo.argmax(1) == labels).mean()), press)
    return best[0], -best[1]


def accuracies(out: Path, head: str = "probe", truth: str = "acc") -> dict[tuple[str, str], list[float]]:
    """(target, source) -> test accuracy per seed, in seed order; the first run of a key counts.
    Only runs made with ``head`` (lines from before session 12 have no "head": "random");
    ``truth``: "acc" after fine-tuning, or "probe_acc", the linear probe before it."""
    lines = reversed(out.read_text().splitlines())  # so that the first run of a key is kept
    runs = {(r["target"], r["source"], r["seed"]): r[truth] for r in map(json.loads, lines)
            if r.get("head", "random") == head and truth in r}
    acc: dict[tuple[str, str], list[float]] = {}
    for key in sorted(runs, key=lambda k: k[2]):
        acc.setdefault(key[:2], []).append(runs[key])
    return acc


def report(args) -> None:
    acc = accuracies(args.out, args.head, args.truth)
    print(f"ground truth: {args.truth} of the runs made with a {args.head} head")
    metrics = ("regret@1", "regret@3", "regret@5", "NDCG@5")
    table: dict[str, dict[str, list[float]]] = {}
    per_target = []
    pair_gains: dict[str, list[tuple[float, float]]] = {}  # estimator -> (predicted, true gain) per pair
    for target in TARGETS:
        cands = [s for s in candidates(target, args.sources) if len(acc.get((target, s), [])) >= args.seeds]
        if len(cands) < 5 or len(acc.get((target, "none"), [])) < args.seeds:
            print(f"{target}: incomplete ({len(cands)} sources with all seeds), left out")
            continue
        orders, gains = cached_rankings(target, cands, args)
        perf_by = {"mean": {s: float(np.mean(acc[(target, s)][:args.seeds])) for s in cands}}
        for seed in range(args.seeds):
            perf_by[seed] = {s: acc[(target, s)][seed] for s in cands}
        base = float(np.mean(acc[(target, "none")][:args.seeds]))
        for name, predicted in gains.items():
            pair_gains.setdefault(name, []).extend((predicted[s], perf_by["mean"][s] - base) for s in cands)
        best = max(perf_by["mean"], key=perf_by["mean"].get)
        row = {"target": target, "none": base, "best": best, "best_acc": perf_by["mean"][best],
               "seed_sd": float(np.mean([np.std(acc[(target, s)][:args.seeds]) for s in cands])),
               "orders": orders}
        for method, order in [*orders.items(), ("random", None)]:  # random: its expectation
            for key, perf in perf_by.items():
                vals = ([regret(perf, order, k) for k in (1, 3, 5)] + [ndcg(perf, order)] if order else
                        [random_regret(perf, k) for k in (1, 3, 5)] + [random_ndcg(perf)])
                for m, v in zip(metrics, vals):
                    table.setdefault(method, {}).setdefault(f"{m}|{key}", []).append(v)
            row[method] = order[:3] if order else None
        per_target.append(row)
        print(f"{target}: none {base:.3f}, best {best} {perf_by['mean'][best]:.3f}; "
              + "; ".join(f"{m}: {', '.join(o[:3])}" for m, o in orders.items()), flush=True)
    if args.weights and per_target:
        picked = add_weight_chosen_out_of_sample(table, args.weights)
        print(f"\n{LOO}: weights picked {dict(sorted(picked.items()))}")
    print(f"\n{len(per_target)} targets x {args.sources} sources x {args.seeds} seeds; mean over targets "
          "(± sd over seeds of the same figure computed per seed)\n")
    print("| ranking | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    summary = {}
    for method, cols in table.items():
        cells = []
        for m in metrics:
            mean = float(np.mean(cols[f"{m}|mean"]))
            per_seed = [float(np.mean(cols[f"{m}|{s}"])) for s in range(args.seeds)]
            summary.setdefault(method, {})[m] = {"mean": mean, "seed_sd": float(np.std(per_seed))}
            cells.append(f"{mean:.2f} ± {np.std(per_seed):.2f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    found = reliability(args.out, [r["target"] for r in per_target], args.sources)
    groups = dict(GROUPS)
    if found:
        groups[f"truth reliable (split-half Spearman >= {RELIABLE:g})"] = [t for t, r in found.items() if r[0] >= RELIABLE]
        groups["truth not reliable"] = [t for t, r in found.items() if r[0] < RELIABLE]
    print_groups(table, per_target, groups)
    print_gains(pair_gains)
    print_reliability(found)
    print_paired(table, per_target, args.seeds)
    if found:  # the same on the targets whose truth orders its sources
        at = [i for i, r in enumerate(per_target) if found.get(r["target"], (0,))[0] >= RELIABLE]
        sub = {m: {k: [v[i] for i in at] for k, v in cols.items()} for m, cols in table.items()}
        print_paired(sub, [per_target[i] for i in at], args.seeds,
                     f"on the {len(at)} targets whose truth is reliable (split-half Spearman >= {RELIABLE:g})")
    print("\n| target | no intermediate | best source (acc) | esm-index top-3 | LogME (fine-tuned) top-3 |")
    print("|---|---|---|---|---|")
    for r in per_target:
        print(f"| {r['target']} | {r['none']:.3f} | {r['best']} ({r['best_acc']:.3f}) | "
              f"{', '.join(r[DEFAULT])} | {', '.join(r['LogME (fine-tuned)'])} |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "targets": per_target,
                                         "accuracy": {f"{t}|{s}": v for (t, s), v in acc.items()}}, indent=1))


LOO = "combined at the domain weight chosen on the other targets"


def add_weight_chosen_out_of_sample(table: dict, weights: list[float]) -> dict[float, int]:
    """Add the combined ranking whose domain weight is, for each target, the one of ``weights``
    with the lowest mean regret@3 on all the other targets (leave one target out). Picking the
    best weight on the same targets it is scored on flatters it; this is the honest figure for
    "tune the weight on this ground truth". Returns how often each weight was picked."""
    names = [f"combined, domain weight {w:g}" for w in weights]
    n = len(table[names[0]]["regret@3|mean"])
    picked: dict[float, int] = {}
    column: dict[str, list[float]] = {}
    for i in range(n):
        rest = [np.mean(np.delete(table[m]["regret@3|mean"], i)) for m in names]
        best = int(np.argmin(rest))  # ties: the smaller weight, listed first
        picked[weights[best]] = picked.get(weights[best], 0) + 1
        for key, values in table[names[best]].items():
            column.setdefault(key, []).append(values[i])
    table[LOO] = column
    return picked


RELIABLE = 0.5  # split-half Spearman at which a target's truth is taken to order its sources


def reliability(out: Path, targets: list[str], sources: int) -> dict[str, tuple[float, int, float, float]]:
    """How far does the ground truth itself order the sources? For a --test 1000 study: per
    target, Spearman of the candidates' probe accuracies on the usual 200 test rows against
    those on the other (disjoint) test rows; with the number of other rows and the spread
    (max - min) of the accuracies on each part. No ranking can agree with the truth better
    than the truth agrees with itself on new rows."""
    by = {(r["target"], r["source"]): r for r in map(json.loads, out.read_text().splitlines())
          if "probe_acc_200" in r}
    found = {}
    for t in targets:
        cands = [s for s in candidates(t, sources) if (t, s) in by and by[(t, s)]["test"] > 250]
        if len(cands) >= 5:
            runs = [by[(t, s)] for s in cands]
            a200 = np.array([r["probe_acc_200"] for r in runs])
            rest = np.array([(r["probe_acc"] * r["test"] - 200 * r["probe_acc_200"]) / (r["test"] - 200) for r in runs])
            found[t] = (common.spearman(a200, rest), runs[0]["test"] - 200, float(np.ptp(a200)), float(np.ptp(rest)))
    return found


def print_reliability(found: dict[str, tuple[float, int, float, float]]) -> None:
    if found:
        print(f"\nThe ground truth against itself: the candidates' probe accuracies on 200 test rows "
              f"against the other test rows, {len(found)} targets; mean Spearman "
              f"{np.mean([r[0] for r in found.values()]):+.2f}\n")
        print("| target | Spearman | other rows | spread of accuracies, 200 rows | other rows |")
        print("|---|---|---|---|---|")
        for t, (rho, n, p200, prest) in found.items():
            print(f"| {t} | {rho:+.2f} | {n} | {p200:.3f} | {prest:.3f} |")


def print_gains(pair_gains: dict[str, list[tuple[float, float]]]) -> None:
    """Can a score tell a user when a source will help at all? Over every (target, source) pair:
    the true gain (accuracy after the source minus without one), and each estimator's predicted
    gain (its score for the source minus its score on the base embeddings)."""
    if not pair_gains:
        return
    print("\nPredicted gain over no intermediate training, against the true gain, over all pairs\n")
    print("| predicted gain | pairs | pairs that gain | Spearman | predicted > 0 | precision of > 0 | recall of > 0 |")
    print("|---|---|---|---|---|---|---|")
    for name, pairs in pair_gains.items():
        pred, true = np.array(pairs).T
        up = pred > 0
        precision = f"{(true[up] > 0).mean():.2f}" if up.any() else "-"
        recall = f"{(up[true > 0]).mean():.2f}" if (true > 0).any() else "-"
        print(f"| {name} | {len(true)} | {(true > 0).sum()} | {common.spearman(pred, true):+.2f} | "
              f"{up.sum()} | {precision} | {recall} |")


def print_groups(table: dict, per_target: list[dict], groups: dict[str, tuple | list]) -> None:
    """regret@3 on seed-mean accuracy for each group of targets (by when it joined the study,
    and by whether the ground truth orders its sources reliably)."""
    names = [r["target"] for r in per_target]
    methods = [m for m in table if not m.startswith("combined, ")]  # not the weight sweep
    print("\nregret@3 by group of targets\n\n| group | targets | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for group, members in groups.items():
        at = [i for i, n in enumerate(names) if n in members]
        if at:
            cells = [f"{np.mean([table[m]['regret@3|mean'][i] for i in at]):.2f}" for m in methods]
            print(f"| {group} | {len(at)} | " + " | ".join(cells) + " |")


def print_paired(table: dict, per_target: list[dict], seeds: int, title: str = "", boot: int = 10000) -> None:
    """The default against each other ranking, paired on the same targets and seeds.

    Both rankings are scored on the same accuracies, so the seed noise that both figures share
    cancels in their difference. For regret@k, delta = default - other (negative: the default
    is better), on seed-mean accuracy; "seed sd": the sd over seeds of the same delta computed
    from each seed alone; "95% CI over targets": a bootstrap of the targets (which targets were
    studied is the larger source of doubt); wins/ties/losses: targets where the default's
    regret is lower/equal/higher."""
    n = len(per_target)
    print(f"\nThe default against each ranking, paired (delta = default - other; negative favours the default)"
          f"{', ' + title if title else ''}\n")
    if n < 2:
        print("(too few targets)")
        return
    picks = np.random.default_rng(0).integers(0, n, size=(boot, n))
    print("| other ranking | metric | delta | seed sd | 95% CI over targets | default wins/ties/losses |")
    print("|---|---|---|---|---|---|")
    for other in table:
        if other == DEFAULT or other.startswith("combined, "):
            continue
        for m in ("regret@1", "regret@3", "regret@5"):
            d = np.array(table[DEFAULT][f"{m}|mean"]) - np.array(table[other][f"{m}|mean"])
            per_seed = [np.mean(np.array(table[DEFAULT][f"{m}|{s}"]) - np.array(table[other][f"{m}|{s}"]))
                        for s in range(seeds)]
            lo, hi = np.percentile(d[picks].mean(1), [2.5, 97.5])
            w, t, l = int((d < -1e-9).sum()), int((abs(d) <= 1e-9).sum()), int((d > 1e-9).sum())
            print(f"| {other} | {m} | {d.mean():+.2f} | {np.std(per_seed):.2f} | [{lo:+.2f}, {hi:+.2f}] | {w}/{t}/{l} |")
