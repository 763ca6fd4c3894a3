#!/usr/bin/env python3
"""Does each twin task's own source beat its twin on its held-out rows, and under which recipe?

The same-task misses of the shipped pool are twins (``common.TWINS``: tasks built from the
same texts). For each twin task and each recipe given, this scores the task's own source and
its twin on the task's 500 held-out rows, two ways: LogME on the real fine-tuned encoder's
embeddings, and ESM-LogME (the source's map applied to the base embeddings). Where the real
models prefer the twin, no better map could fix the miss; where a recipe turns the real
preference round, that recipe is the lever (BENCHMARKS.md §3, session 10).

A recipe is LABEL MODELS ESMS: a folder of fine-tuned encoders (build_pool.py keeps them in
CACHE/models) and one of ESM folders, both named by task. Pairs a recipe has not built are
skipped. Default: the shipped pool's, "100 steps" CACHE/models CACHE/pool_fit3k.

Usage: python tools/twin_check.py [--recipe "300 steps" DIR/models DIR/pool] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
from esm_index.esm import ESM  # noqa: E402
from esm_index.index import SourceIndex  # noqa: E402
from esm_index.logme import TargetStats, logme, score_esms  # noqa: E402


def main() -> None:
    from transformers import AutoModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", nargs=3, action="append", metavar=("LABEL", "MODELS", "ESMS"), default=[])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [("100 steps", common.CACHE / "models", common.CACHE / "pool_fit3k"),
               *((label, Path(m), Path(e)) for label, m, e in args.recipe)]
    embedder = SourceIndex(common.REPO / "indexes" / "default", readonly=True).embedder  # the index's model and spec
    print("| target | twin | recipe | real LogME own / twin | ESM-LogME own / twin | own first? real, ESM |")
    print("|---|---|---|---|---|---|")
    for pair in sorted(sorted(p) for p in common.TWINS):
        for target, twin in (pair, pair[::-1]):
            data, _ = common.load_task(target)
            texts = [data.texts[i] for i in common.split(target, len(data))[1]]
            x, y = common.held_out_target(target, embedder)
            stats = TargetStats.from_embeddings(x, y)
            for label, models, esms in recipes:
                if not all((esms / s / "DONE").is_file() for s in pair):
                    continue
                real = [logme(embedder.with_model(AutoModel.from_pretrained(models / s)).embed(texts), y)
                        for s in (target, twin)]
                maps = [ESM.load(esms / s) for s in (target, twin)]
                esm = score_esms(stats, torch.from_numpy(np.stack([m.weight for m in maps]).astype(np.float64)),
                                 torch.from_numpy(np.stack([m.bias for m in maps]).astype(np.float64)))
                print(f"| {target} | {twin} | {label} | {real[0]:.4f} / {real[1]:.4f} | {esm[0]:.4f} / {esm[1]:.4f} | "
                      f"{'yes' if real[0] > real[1] else 'no'}, {'yes' if esm[0] > esm[1] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
