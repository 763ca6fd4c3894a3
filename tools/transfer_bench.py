#!/usr/bin/env python3
"""Real transfer ground truth: does fine-tuning on the recommended source first help?

The paper's protocol, at CPU size. For each target (a small labelled task: the three sample
targets and held-out rows of pool tasks, ``TARGETS``), split into a small training part
(``--train``) and a test part:
  * fine-tune the base model on the target's training part directly (source "none"), and
  * after intermediate fine-tuning on each candidate source (the fine-tuned encoders that
    tools/build_pool.py keeps in CACHE/models), fine-tune on the same training part;
then measure accuracy on the test part. The target's head starts from a linear probe of the
starting encoder's features (LP-FT, ``--head probe``, since session 12): with a random head,
which a few dozen steps at lr 5e-5 hardly move, accuracy measured how that head happened to
line up with each encoder (a sentiment source scored 0.32 on a balanced sentiment target,
0.79 with the probe head; BENCHMARKS.md §5). Each run also records ``probe_acc``, the probe's
accuracy before fine-tuning (``--truth probe_acc`` reports on it). Every (target, source,
seed) run is one JSONL line in ``--out``; a rerun skips the lines already there, and
``--worker i/n`` shares the runs between processes.

``--report`` then scores rankings of each target's candidates, all computed from the
target's training part only: the index's three methods (the default "combined", ESM-LogME
alone, domain similarity alone: cosine of mean base embeddings), LogME on the real
fine-tuned models' embeddings, and random (its expectation, exactly). Metrics: regret@k = (best - best of the top k) / best in %, the
paper's definition, on seed-mean accuracy; NDCG@5 with each source's accuracy gain over the
worst candidate as its relevance. Seed noise: the same metrics computed on each seed's
accuracies alone, their standard deviation across seeds.

``--own`` instead runs each sample target's own task and its twins as sources, the ones the
candidates leave out, to see whether the same-task check's "own task first" is also what
transfers best (write them to another ``--out``: the report ignores them anyway).

``--probe-only`` skips the fine-tuning: each start's linear probe alone, one run per
(target, source), in seconds instead of a minute and a half for three seeds. Report on it with
``--truth probe_acc --seeds 1`` (same ``--out``). ``--test 1000`` tests on up to 1,000 rows
(a pool task's own source rows after its held-out ones) instead of 200, to halve the test
noise; such runs also record ``probe_acc_200``, on the usual 200 rows.

The report also scores two experiments beside the product's rankings (session 13): the
leave-one-out accuracy of a ridge classifier on the ESM-mapped or the real fine-tuned
embeddings (``ridge_loo_accuracy``: the ground truth is a linear probe's accuracy, which
LogME's evidence only approximates), and the default at the domain weight chosen on the
other targets (with ``--weights``). And it asks whether any score can tell a user that a
source will help at all: each score's predicted gain over the base embeddings against the
true gain over no intermediate training, over every (target, source) pair.

Usage: python tools/transfer_bench.py [--worker 0/2] [--threads 1]
       python tools/transfer_bench.py --probe-only --out probe.jsonl [--test 1000 --sources 15]
       python tools/transfer_bench.py --own --seeds 5 --out own.jsonl
       python tools/transfer_bench.py --report [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
from esm_index.data import LabelledData, load_labelled  # noqa: E402
from esm_index.domain import DOMAIN_WEIGHT  # noqa: E402  (the default ranking's; part of the rankings' cache key)

# (name, where the rows come from); a pool task's rows are its held-out target rows.
TARGETS = ("sample:movie_reviews.csv", "sample:sms_spam.csv", "sample:news_topics.csv",
           "task:en_debate_party", "task:en_wikipedia_uncertainty", "task:en_election_tweets_author",
           "task:en_movie_review_polarity", "task:en_news_article_outlet",
           # added in session 4, after the combined ranking was chosen: a check it was not tuned on
           "task:en_friends_speaker", "task:en_health_tweet_outlet", "task:en_bbc_news_topic", "task:en_20newsgroups",
           # added in session 6, after the shipped pool and its default were fixed: a second check
           "task:en_sms_spam", "task:en_parlspeech_party", "task:en_movie_sentence_polarity",
           "task:en_reuters_r8", "task:nl_book_review_polarity", "task:sl_news_comment_topic",
           "task:es_parlspeech_party", "task:zh_news_sentiment",
           # added in session 9, every other pool task with the 178 rows needed: a third check
           "task:en_rotten_tomatoes", "task:en_reuters_r52", "task:fr_book_review_polarity",
           "task:de_parlspeech_party", "task:nl_parlspeech_party", "task:sl_news_comment_sentiment",
           "task:zh_product_review_sentiment")
# Targets by when they joined the study, for the report's per-group lines.
GROUPS = {"session 3": TARGETS[:8], "session 4": TARGETS[8:12], "session 6": TARGETS[12:20],
          "session 9": TARGETS[20:]}
OWN = {"sample:movie_reviews.csv": "en_rotten_tomatoes", "sample:sms_spam.csv": "en_sms_spam",
       "sample:news_topics.csv": "en_bbc_news_topic"}
# Candidate sources, in order; a target's own task and its twins are dropped, then the first
# --sources are kept.
SOURCES = ("en_movie_sentence_polarity", "en_sms_spam", "en_bbc_news_topic", "en_20newsgroups",
           "en_wikipedia_uncertainty", "en_election_tweets_author", "en_parlspeech_party",
           "en_friends_speaker", "en_health_tweet_outlet", "zh_news_sentiment", "en_email_spam",
           "en_reuters_r8", "nl_book_review_polarity", "en_debate_party", "en_rotten_tomatoes")
OUT = common.CACHE / "transfer" / "runs.jsonl"
DEFAULT = "esm-index (default: combined)"  # the report's name for the index's default ranking


def load_target(name: str) -> LabelledData:
    kind, what = name.split(":", 1)
    if kind == "sample":
        return load_labelled(common.SAMPLES / what, ["text"], "label")
    data, _ = common.load_task(what)
    _, tgt = common.split(what, len(data))
    part = common.subset(data, tgt)
    return LabelledData(part.texts, np.unique(part.labels, return_inverse=True)[1], "classification")


def target_split(name: str, data: LabelledData, train: int, test: int = 200) -> tuple[LabelledData, LabelledData]:
    """A fixed split of a target into a small training part and a test part (at most ``test``
    rows; a larger ``test`` keeps the smaller one's rows and adds more).

    A pool task's target has 500 held-out rows, so past 372 test rows its test part goes on
    with the task's own source rows (``more_test_rows``): no candidate was trained on them,
    since a target's own task and its twins are never candidates. 200 test rows leave a
    probe's accuracy a standard error of about 3.5 points, as large as the gaps between
    sources; 1,000 halve it. The training part, all the rankings see, is the same at any size."""
    order = np.random.default_rng(zlib.crc32(name.encode())).permutation(len(data))
    tr, te = np.sort(order[:train]), np.sort(order[train:train + test])
    if len(te) < 50:
        raise SystemExit(f"{name}: {len(data)} rows leave {len(te)} to test on after {train} for training")
    test_part = common.subset(data, te)
    if len(te) < test and name.startswith("task:"):
        more = more_test_rows(name.split(":", 1)[1], test - len(te))
        test_part = LabelledData(test_part.texts + more.texts, np.concatenate([test_part.labels, more.labels]),
                                 "classification")
    return common.subset(data, tr), test_part


def more_test_rows(task: str, k: int) -> LabelledData:
    """Up to ``k`` of a pool task's source rows, in a fixed random order, with its held-out
    rows' class numbering (``load_target``; rows of a class the held-out rows lack are left out)."""
    data, _ = common.load_task(task)
    src, tgt = common.split(task, len(data))
    dense = {c: i for i, c in enumerate(np.unique(data.labels[tgt]))}
    src = np.random.default_rng(zlib.crc32(task.encode()) + 1).permutation(src)
    src = [i for i in src if data.labels[i] in dense][:k]
    return LabelledData([data.texts[i] for i in src], np.array([dense[data.labels[i]] for i in src]), "classification")


def candidates(name: str, k: int) -> list[str]:
    own = OWN.get(name, name.split(":", 1)[1])
    return [s for s in SOURCES if not common.twins(s, own)][:k]


def run_one(embedder, target: str, source: str, seed: int, args) -> dict:
    """Fine-tune (source's encoder, or the base) on the target's training part; test accuracy."""
    import torch
    from transformers import AutoModel

    from esm_index.finetune import FinetuneConfig, finetune_with_head

    train, test = target_split(target, load_target(target), args.train, args.test)
    start = embedder if source == "none" else embedder.with_model(
        AutoModel.from_pretrained(common.CACHE / "models" / source))
    if args.probe_only:  # no fine-tuning on the target: the probe alone, which has no seed
        t0 = time.perf_counter()
        right = probe_accuracy(start, train, test, each=True)
        record = {"target": target, "source": source, "seed": 0, "head": "probe",
                  "probe_acc": float(right.mean()), "train": len(train), "test": len(test)}
        if args.test > 200:  # also on the study's usual 200 test rows, a subset of these
            usual = set(target_split(target, load_target(target), args.train)[1].texts)
            record["probe_acc_200"] = float(right[[t in usual for t in test.texts]].mean())
        return {**record, "seconds": round(time.perf_counter() - t0, 1)}
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=16, lr=args.lr, max_length=args.max_length, seed=seed)
    t0 = time.perf_counter()
    encoder, head = finetune_with_head(start, train, cfg, probe_head=args.head == "probe")
    with torch.inference_mode():
        pooled = torch.from_numpy(embedder.with_model(encoder).embed(test.texts))
        acc = float((head(pooled).argmax(1).numpy() == test.labels).mean())
    if (target, source) not in PROBE_ACC:  # seed-free: fitted once for all seeds of a pair
        PROBE_ACC[(target, source)] = probe_accuracy(start, train, test)
    return {"target": target, "source": source, "seed": seed, "head": args.head, "acc": acc,
            "probe_acc": PROBE_ACC[(target, source)], "train": len(train), "test": len(test),
            "seconds": round(time.perf_counter() - t0, 1)}


PROBE_ACC: dict[tuple[str, str], float] = {}  # (target, source) -> probe_accuracy, this process


def probe_accuracy(start, train: LabelledData, test: LabelledData, each: bool = False):
    """Test accuracy of a linear probe of the starting encoder's features, before any
    fine-tuning on the target: what the source's space alone gives (seed-free). ``each``:
    whether each test row was right, instead of their mean."""
    import torch

    from esm_index.finetune import fit_probe_head

    linear = torch.nn.Linear(start.dim, int(train.labels.max()) + 1)
    fit_probe_head(linear, torch.from_numpy(start.embed(train.texts)), torch.as_tensor(train.labels), False)
    with torch.inference_mode():
        right = linear(torch.from_numpy(start.embed(test.texts))).argmax(1).numpy() == test.labels
    return right if each else float(right.mean())


def encoder_built(source: str) -> bool:
    """Whether build_pool.py has kept ``source``'s fine-tuned encoder (a full or --models-only build)."""
    return any((common.CACHE / folder / source / "DONE").exists() for folder in ("pool", "models_built"))


def run(args) -> None:
    import torch

    from esm_index.embed import EmbeddingSpec, Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    def done() -> set:
        return {(r["target"], r["source"], r["seed"]) for r in map(json.loads, args.out.open())
                if r.get("head", "random") == args.head} if args.out.is_file() else set()

    me, workers = map(int, args.worker.split("/"))
    if args.probe_only:
        args.seeds = 1
    # target by target, so that a study cut short still reports whole targets
    todo = [(t, s, seed) for t in TARGETS for seed in range(args.seeds)
            for s in ["none", *candidates(t, args.sources)]]
    if args.own:  # the samples' own tasks and their twins, which the candidates leave out
        todo = [(t, s, seed) for t, own in OWN.items() for seed in range(args.seeds)
                for s in sorted({own, *(s for s in SOURCES if common.twins(s, own))})]
    todo = [k for k in todo if k not in done() and zlib.crc32(repr(k).encode()) % workers == me]
    if args.reverse:  # a second process on the same share, meeting the first in the middle
        todo.reverse()
    embedder = Embedder(spec=EmbeddingSpec(max_length=args.max_length))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, (t, s, seed) in enumerate(todo, 1):
        if s != "none" and not encoder_built(s):
            continue  # not built yet: a later rerun picks it up
        if (t, s, seed) in done():
            continue
        record = run_one(embedder, t, s, seed, args)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[{i}/{len(todo)}] {json.dumps(record)}", flush=True)


# ---- report --------------------------------------------------------------------------------
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


def cached_rankings(target: str, cands: list[str], args) -> tuple[dict, dict]:
    """``rankings`` of ``cands``, kept in CACHE/transfer/rankings (a JSON file per target, index
    and options): they take half a minute a target and do not depend on the ground truth, so
    reporting the same study on another truth, --seeds or --sources reuses them. They are
    computed for all of a target's candidates and cut down to ``cands``: every ranking orders
    sources by a score of each source alone, so the order of a subset is the cut-down order."""
    every = candidates(target, len(SOURCES))
    stamp = max(f.stat().st_mtime_ns for f in args.index.iterdir())
    key = json.dumps([target, every, str(args.index.resolve()), stamp, args.train, args.weights, DOMAIN_WEIGHT,
                      RANKINGS_VERSION])
    path = common.CACHE / "transfer" / "rankings" / f"{zlib.crc32(key.encode()):08x}.json"
    if path.is_file() and json.loads(path.read_text())["key"] == key:
        kept = json.loads(path.read_text())
    else:
        orders, gains = rankings(target, every, args)
        kept = {"key": key, "orders": orders, "gains": gains}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kept))
    return ({m: [s for s in order if s in cands] for m, order in kept["orders"].items()},
            {e: {s: g[s] for s in cands} for e, g in kept["gains"].items()})


RANKINGS_VERSION = 1  # bump when ``rankings`` changes what it computes


def rankings(target: str, cands: list[str], args) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """Each method's order of ``cands``, from the target's training part only; and, for the
    scores that have a no-source counterpart, each source's predicted gain over the base model
    (its score minus the same score on the base embeddings)."""
    import torch
    from transformers import AutoModel

    from esm_index.domain import combine
    from esm_index.index import SourceIndex
    from esm_index.logme import logme

    train, _ = target_split(target, load_target(target), args.train)
    index = SourceIndex(args.index, readonly=True)
    x = index.embed(train.texts)
    product = {}
    for method in ("combined", "esm-logme", "domain"):
        ranked = index.rank_embeddings(x, train.labels, "classification", top=len(index), exact=True, method=method)
        score = {r.meta.get("task_id", r.source): r.score for r in ranked.results}
        product[method] = sorted(cands, key=lambda s: -score[s])
    by_task = {r.meta.get("task_id", r.source): r.esm_logme for r in ranked.results}
    names = [r.meta.get("task_id", r.source) for r in ranked.results]
    dom = [np.nan if r.domain_similarity is None else r.domain_similarity for r in ranked.results]
    for wt in args.weights:  # the combined ranking at other domain weights (a sensitivity check)
        score = dict(zip(names, combine([by_task[n] for n in names], dom, "combined", wt)))
        product[f"combined, domain weight {wt:g}"] = sorted(cands, key=lambda s: -score[s])
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
    return {DEFAULT: product["combined"], "ESM-LogME (esm-logme)": product["esm-logme"],
            "ESM-LogME minus shuffled-label null": sorted(cands, key=lambda s: null[s] - by_task[s]),
            "LogME (fine-tuned)": sorted(cands, key=lambda s: -real[s]),
            "ridge LOO accuracy (ESM-mapped)": sorted(cands, key=lambda s: mapped_loo[s], reverse=True),
            "ridge LOO accuracy (fine-tuned)": sorted(cands, key=lambda s: real_loo[s], reverse=True),
            "domain similarity (domain)": product["domain"],
            **{k: v for k, v in product.items() if k.startswith("combined, ")}}, gains


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
        for name, predicted in gains.items():
            for s in cands:
                pair_gains.setdefault(name, []).append(
                    (predicted[s], float(np.mean(acc[(target, s)][:args.seeds])) - float(np.mean(acc[(target, "none")][:args.seeds]))))
        perf_by = {"mean": {s: float(np.mean(acc[(target, s)][:args.seeds])) for s in cands}}
        for seed in range(args.seeds):
            perf_by[seed] = {s: acc[(target, s)][seed] for s in cands}
        base = float(np.mean(acc[(target, "none")][:args.seeds]))
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


def tied_spearman(a, b) -> float:
    """Spearman's rho with tied values sharing their mean rank (accuracies on a few hundred
    rows tie often; ``common.spearman`` expects continuous scores)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


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
            found[t] = (tied_spearman(a200, rest), runs[0]["test"] - 200, float(np.ptp(a200)), float(np.ptp(rest)))
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
        print(f"| {name} | {len(true)} | {(true > 0).sum()} | {tied_spearman(pred, true):+.2f} | "
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--train", type=int, default=128, help="target training examples")
    ap.add_argument("--test", type=int, default=200,
                    help="test rows per target, at most (the study so far: 200; use another --out)")
    ap.add_argument("--sources", type=int, default=8, help="candidate sources per target")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--worker", default="0/1", help="i/n: this process runs the i-th of n shares")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reverse", action="store_true", help="take this share's runs last first")
    ap.add_argument("--head", choices=("probe", "random"), default="probe",
                    help="start the target's head from a linear probe (LP-FT, since session 12) or at random")
    ap.add_argument("--truth", choices=("acc", "probe_acc", "probe_acc_200"), default="acc",
                    help="report on accuracy after fine-tuning, or the probe's before it "
                         "(probe_acc_200: on the usual 200 test rows of a --probe-only --test 1000 study)")
    ap.add_argument("--probe-only", action="store_true",
                    help="only the linear probe of each start (no fine-tuning, one seed; use another --out)")
    ap.add_argument("--own", action="store_true",
                    help="run each sample's own task and its twins instead of the candidates (use another --out)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--index", type=Path, default=common.REPO / "indexes" / "default")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--weights", type=lambda v: [float(w) for w in v.split(",") if w], default=[],
                    help="also report the combined ranking at these domain weights, e.g. 0,1,3,6,12")
    args = ap.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
