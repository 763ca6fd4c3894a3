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

``--report`` then scores how well each ranking of a target's candidates (the index's methods,
LogME on the real fine-tuned models, experiments, random) picks the sources that did best:
regret@k, the paper's metric, NDCG@5 and seed noise; ``tools/transfer_report.py`` does it
and explains each part.

``--own`` instead runs each sample target's own task and its twins as sources, the ones the
candidates leave out, to see whether the same-task check's "own task first" is also what
transfers best (write them to another ``--out``: the report ignores them anyway).

``--probe-only`` skips the fine-tuning: each start's linear probe alone, one run per
(target, source), in seconds instead of a minute and a half for three seeds. Report on it with
``--truth probe_acc --seeds 1`` (same ``--out``). ``--test 1000`` tests on up to 1,000 rows
(a pool task's own source rows after its held-out ones) instead of 200, to halve the test
noise; such runs also record ``probe_acc_200``, on the usual 200 rows.

Usage: python tools/transfer_bench.py [--worker 0/2] [--threads 1]
       python tools/transfer_bench.py --probe-only --out probe.jsonl [--test 1000 --sources 15]
       python tools/transfer_bench.py --own --seeds 5 --out own.jsonl
       python tools/transfer_bench.py --report [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
from esm_index.data import LabelledData, load_labelled  # noqa: E402

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

    data = load_target(target)
    train, test = target_split(target, data, args.train, args.test)
    start = embedder if source == "none" else embedder.with_model(
        AutoModel.from_pretrained(common.CACHE / "models" / source))
    if args.probe_only:  # no fine-tuning on the target: the probe alone, which has no seed
        t0 = time.perf_counter()
        right = probe_accuracy(start, train, test, each=True)
        record = {"target": target, "source": source, "seed": 0, "head": "probe",
                  "probe_acc": float(right.mean()), "train": len(train), "test": len(test)}
        if args.test > 200:  # also on the study's usual 200 test rows, a subset of these
            usual = set(target_split(target, data, args.train)[1].texts)
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
    if args.report:
        from transfer_report import report

        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
