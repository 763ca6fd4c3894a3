"""What the pool-building and evaluation scripts share: where the cache lives, how a prepared
task is read, and how each task is split into disjoint *source* rows (fine-tuning and ESM
fitting) and *target* rows (held out, used as that task's evaluation target).

Scripts in tools/ import this as ``import common`` (Python puts a script's own folder first on
``sys.path``); nothing in ``esm_index`` imports it.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from esm_index.data import LabelledData, encode_labels

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ESM_INDEX_CACHE", Path.home() / ".cache" / "esm-index"))
SAMPLES = REPO / "indexes" / "samples"
TARGET_ROWS = 500  # held-out target rows per task (half the task when it is smaller than 1,000)

# Short-text tasks whose held-out rows every fine-tuned model embeds for the fidelity study
# (LogME on real fine-tuned embeddings vs ESM-LogME); short texts keep that affordable on a CPU.
FIDELITY_TARGETS = ("en_movie_sentence_polarity", "en_wikipedia_uncertainty", "en_election_tweets_author",
                    "en_friends_speaker", "en_sms_spam", "en_health_tweet_outlet", "en_debate_party",
                    "zh_product_review_sentiment")

# Tasks built from the same texts: one must not count as "transfer" to the other.
TWINS = {frozenset(("en_movie_sentence_polarity", "en_rotten_tomatoes")),
         frozenset(("sl_news_comment_sentiment", "sl_news_comment_topic")),
         frozenset(("en_reuters_r8", "en_reuters_r52"))}  # R8 is a subset of R52


def task_ids(cache: Path = CACHE) -> list[str]:
    """The prepared tasks, in ``prepare_tasks.py``'s order."""
    return [t["id"] for t in json.loads((cache / "tasks" / "index.json").read_text())]


def load_task(task_id: str, cache: Path = CACHE) -> tuple[LabelledData, dict]:
    """A prepared task as (texts, class ids) and its metadata."""
    tasks = cache / "tasks"
    meta = json.loads((tasks / f"{task_id}.meta.json").read_text())
    rows = [json.loads(line) for line in (tasks / f"{task_id}.jsonl").open(encoding="utf-8")]
    labels, names = encode_labels([r["label"] for r in rows], "classification")
    return LabelledData([r["text"] for r in rows], labels, "classification", names), meta


def split(task_id: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(source rows, target rows) of a task with ``n`` rows: a fixed random ``TARGET_ROWS``
    (or half of a small task) are held out as the target and never fine-tuned or fitted on."""
    rng = np.random.default_rng(zlib.crc32(task_id.encode()))
    order = rng.permutation(n)
    k = min(TARGET_ROWS, n // 2)
    return np.sort(order[k:]), np.sort(order[:k])


def source_rows(task_id: str, data: LabelledData, cache: Path = CACHE) -> np.ndarray:
    """The rows a task's source is fine-tuned and fitted on: ``split``'s source rows less any
    text that a twin task (``TWINS``) holds out as a target row. Twins share texts (R8 is a
    subset of R52), so without this a twin's source would have been trained on most of the
    other's target rows (463 of R8's 500; 344 of the Slovene sentiment task's 500)."""
    src, _ = split(task_id, len(data))
    held_out = set()
    for other in task_ids(cache):
        if other != task_id and twins(other, task_id):
            twin, _ = load_task(other, cache)
            held_out.update(twin.texts[i] for i in split(other, len(twin))[1])
    return src[[data.texts[i] not in held_out for i in src]] if held_out else src


def subset(data: LabelledData, idx: np.ndarray) -> LabelledData:
    """The rows ``idx`` of ``data`` (class ids unchanged, so they stay comparable)."""
    return LabelledData([data.texts[i] for i in idx], data.labels[idx], data.task, data.label_names)


def twins(a: str, b: str) -> bool:
    """True when tasks ``a`` and ``b`` are the same task or share their texts."""
    return a == b or frozenset((a, b)) in TWINS


def base_embeddings(embedder, texts: list[str], cache: Path = CACHE) -> np.ndarray:
    """Base-model embeddings of ``texts``, computed once: the library's content-hashed cache
    (``embed.cached_embeddings``) under CACHE/base."""
    from esm_index.embed import cached_embeddings

    return cached_embeddings(cache / "base", embedder.spec, texts, lambda: embedder.embed(texts))


def held_out_target(task_id: str, embedder, cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """A task's held-out target rows as (base embeddings, class ids numbered densely): the
    target the evaluation scripts rank the pool for."""
    data, _ = load_task(task_id, cache)
    _, tgt = split(task_id, len(data))
    x = base_embeddings(embedder, [data.texts[i] for i in tgt], cache)
    return x, np.unique(data.labels[tgt], return_inverse=True)[1]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; tied values share their mean rank (accuracies on a few
    hundred test rows tie often; continuous scores never do, and get plain ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def label_null_scores(x: np.ndarray, labels: np.ndarray, weights, biases, rounds: int = 3,
                      seed: int = 0) -> np.ndarray:
    """Each source's mean ESM-LogME for the same target texts with the labels shuffled.

    An experiment towards a hub-aware score (``score - null`` keeps what the target's labels
    add beyond a source's spread alone). Measured in BENCHMARKS.md (same-task retrieval 18/26
    against 17/26, transfer regret@3 worse), so it is not in the product.
    """
    from esm_index.logme import TargetStats, score_esms

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    return np.mean([score_esms(TargetStats.from_embeddings(x, labels[rng.permutation(len(labels))]), weights, biases)
                    for _ in range(rounds)], axis=0)
