#!/usr/bin/env python3
"""How reliable is the fidelity study's reference ranking? A second, independent draw.

Fidelity (``eval_pool.py``, ``fidelity_fits.py``) compares ESM-LogME with LogME on the real
fine-tuned models' embeddings of 500 held-out rows of each fidelity target (draw A). That
reference is itself an estimate from 500 rows: a second draw of 500 rows of the same task
(draw B) orders the sources somewhat differently, and no score can be expected to agree with
draw A's ranking better than draw B's does. This script measures that test-retest agreement
and the fidelity on both draws:

  retest   LogME on the fine-tuned embeddings, draw A against draw B;
  ESM (A)  ESM-LogME against LogME on the fine-tuned embeddings, both on draw A (as eval_pool);
  ESM (B)  the same on draw B;
  ESM (A+B)  the same on both draws together (n up to 1,000): the least noisy reference
           this study has, since each draw alone reproduces the other only so far.

Draw B: up to 500 of the task's source rows that are not among the packaged fit texts (no
map was fitted on them) and not a twin's target row. The sources ranked are those that are
not the target's own task or its twin, so no fine-tuned model ranked saw these texts in
training. Each source's encoder (CACHE/models, kept by build_pool.py) embeds draw B once;
the embeddings are cached in CACHE/retest/<source>.npz. Draw A's fine-tuned embeddings come
from the build folders' fidelity.npz (--pool); where there are none (a machine that kept only
the encoders), the encoders embed draw A too, cached beside draw B.

Usage: python tools/fidelity_retest.py [--pool CACHE/pool_fit3k] [--threads 1]
       python tools/fidelity_retest.py --part 0/2 --threads 1   # embed only (one of two workers)
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
from esm_index.finetune import FIT_TEXTS  # noqa: E402
from esm_index.index import SourceIndex  # noqa: E402
from esm_index.logme import TargetStats, logme, score_esms  # noqa: E402
from fidelity_fits import agreement, print_table  # noqa: E402

ROWS = 500


def second_draw(task: str, fitted: set[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Draw B of a task: texts, class ids numbered densely, and the task's own class ids of
    draw A then draw B (to number the classes of both draws together); ``fitted``: the fit texts."""
    data, _ = common.load_task(task)
    rows = [i for i in common.source_rows(task, data) if data.texts[i] not in fitted]
    rows = np.sort(np.random.default_rng(zlib.crc32(task.encode()) + 9).permutation(rows)[:ROWS])
    both = np.concatenate([data.labels[common.split(task, len(data))[1]], data.labels[rows]])
    return [data.texts[i] for i in rows], np.unique(data.labels[rows], return_inverse=True)[1], both


def draw_a_texts(task: str) -> list[str]:
    """Draw A: the task's held-out target rows (what eval_pool.py ranks the pool for)."""
    data, _ = common.load_task(task)
    return [data.texts[i] for i in common.split(task, len(data))[1]]


def tuned_embeddings(source: str, texts: dict[str, list[str]], embedder) -> dict[str, np.ndarray]:
    """Source's fine-tuned encoder's embeddings of each named text list, cached by name."""
    path = common.CACHE / "retest" / f"{source}.npz"
    have = dict(np.load(path)) if path.is_file() else {}
    missing = [t for t in texts if t not in have]
    if missing:
        from transformers import AutoModel

        tuned = embedder.with_model(AutoModel.from_pretrained(common.CACHE / "models" / source))
        for t in missing:
            have[t] = tuned.embed(texts[t]).astype(np.float16)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **have)  # after each draw: an interrupted worker keeps what it embedded
        print(f"embedded {len(missing)} draws with {source}", flush=True)
    return have


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=Path, default=common.CACHE / "pool_fit3k", help="build folders with fidelity.npz")
    ap.add_argument("--index", type=Path, default=common.REPO / "indexes" / "default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--part", default=None, metavar="I/N",
                    help="only embed, for every N-th source from the I-th (side-by-side workers)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    index = SourceIndex(args.index, readonly=True)
    tasks = common.task_ids()
    fitted = set(FIT_TEXTS.read_text(encoding="utf-8").splitlines())
    draws = {t: second_draw(t, fitted) for t in common.FIDELITY_TARGETS}
    texts = {t: d[0] for t, d in draws.items()}
    draw_a_from_encoders = not all((args.pool / s / "fidelity.npz").is_file() for s in tasks)
    if draw_a_from_encoders:
        print(f"no fidelity.npz in {args.pool}: the encoders embed draw A too")
        texts |= {f"{t}:A": draw_a_texts(t) for t in common.FIDELITY_TARGETS}
    if args.part:
        i, n = map(int, args.part.split("/"))
        for s in tasks[i::n]:
            tuned_embeddings(s, texts, index.embedder)
        return
    tuned_b = {s: tuned_embeddings(s, texts, index.embedder) for s in tasks}  # draw B (and A, keyed "t:A")
    tuned_a = {s: ({t: tuned_b[s][f"{t}:A"] for t in common.FIDELITY_TARGETS} if draw_a_from_encoders
                   else dict(np.load(args.pool / s / "fidelity.npz"))) for s in tasks}

    rows = {"retest": [], "ESM (A)": [], "ESM (B)": [], "ESM (A+B)": []}
    for t in common.FIDELITY_TARGETS:
        sources = [s for s in tasks if not common.twins(s, t)]
        x_a, y_a = common.held_out_target(t, index.embedder)
        x_b = common.base_embeddings(index.embedder, draws[t][0])
        y_b = draws[t][1]
        real_a = np.asarray([logme(tuned_a[s][t].astype(np.float32), y_a) for s in sources])
        real_b = np.asarray([logme(tuned_b[s][t].astype(np.float32), y_b) for s in sources])
        y_ab = np.unique(draws[t][2], return_inverse=True)[1]
        real_ab = np.asarray([logme(np.concatenate([tuned_a[s][t], tuned_b[s][t]]).astype(np.float32), y_ab)
                              for s in sources])
        esms = [index.get_esm(s) for s in sources]
        w = np.stack([e.weight for e in esms]).astype(np.float64)
        b = np.stack([e.bias for e in esms]).astype(np.float64)
        esm = {name: score_esms(TargetStats.from_embeddings(x.astype(np.float32), y), torch.from_numpy(w),
                                torch.from_numpy(b))
               for name, x, y in (("A", x_a, y_a), ("B", x_b, y_b), ("A+B", np.concatenate([x_a, x_b]), y_ab))}
        rows["retest"].append((t, *agreement(real_a, real_b)))
        rows["ESM (A)"].append((t, *agreement(real_a, esm["A"])))
        rows["ESM (B)"].append((t, *agreement(real_b, esm["B"])))
        rows["ESM (A+B)"].append((t, *agreement(real_ab, esm["A+B"])))
        print(t, len(y_b), "rows in draw B;", {k: tuple(round(float(v), 3) for v in r[-1][1:]) for k, r in rows.items()},
              flush=True)

    print_table("comparison", rows)


if __name__ == "__main__":
    sys.exit(main())
