#!/usr/bin/env python3
"""Fine-tune the base model on every prepared task and fit its ESM (the long job).

For each task written by ``tools/prepare_tasks.py``:
  1. split it (``common.split``) into source rows and held-out target rows (a twin task's
     target rows are kept out of its source rows too: ``common.source_rows``);
  2. fine-tune the packaged all-MiniLM-L6-v2 on the source rows with a fixed budget of
     optimizer steps (``--steps``; the paper's AdamW recipe otherwise);
  3. fit the ESM on up to ``--fit-examples`` source rows and the packaged fit texts
     (``esm_index/fit_texts.txt``: every kind of text in the pool; less any held-out row)
     at the index's 128 tokens;
  4. embed the held-out rows of ``common.FIDELITY_TARGETS`` with the fine-tuned encoder
     (LogME on these real embeddings is what ESM-LogME imitates: tools/eval_pool.py);
  5. keep the fine-tuned encoder (CACHE/models/<task>, safetensors) for the transfer ground
     truth (tools/transfer_bench.py).
Output: CACHE/pool/<task>/ with the ESM in hfselect's format plus ``fidelity.npz``; then
``esm-index import`` makes an index of it.

Resumable and parallel: a task with a DONE marker is skipped; each worker claims a task by
creating CLAIM (holding its pid) and a claim whose process is gone is taken over, so several
workers (``--threads 1`` each) share the tasks and an interrupted build redoes only the task
it was on. ``--refit`` redoes steps 3-4 from the kept encoders, without fine-tuning; ``--models-only``
does steps 1, 2 and 5 alone (the encoders the transfer study needs, no maps).

Usage: python tools/build_pool.py [--steps 100] [--lr 5e-5] [--max-length 64]
       [--fit-examples 1500] [--threads N] [--only TASK ...] [--refit] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
from esm_index.domain import DOMAIN_KEY  # noqa: E402
from esm_index.data import LabelledData  # noqa: E402
from esm_index.embed import Embedder  # noqa: E402
from esm_index.finetune import (  # noqa: E402
    POOL_RECIPE, FinetuneConfig, esm_from_models, finetune, fit_sample, planned_steps)


def claim(folder: Path) -> bool:
    """Take ``folder`` for this process unless it is done or another live process holds it."""
    if (folder / "DONE").exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / "CLAIM"
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(mark.read_text() or 0), 0)
            return False  # a live worker has it
        except (ProcessLookupError, ValueError):
            mark.unlink(missing_ok=True)  # its worker died: take it over
            return claim(folder)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def held_out_texts(cache: Path) -> set[str]:
    """Every task's held-out target rows: no map is ever fitted on one."""
    held_out = set()
    for tid in common.task_ids(cache):
        data, _ = common.load_task(tid, cache)
        held_out.update(data.texts[i] for i in common.split(tid, len(data))[1])
    return held_out


def write_fit_texts(cache: Path, per_task: int, max_chars: int = 1000) -> int:
    """Write the packaged ``esm_index/fit_texts.txt``: the index's reference texts plus
    ``per_task`` source rows of every task (seeded; never any task's held-out row), each on
    one line and cut to ``max_chars`` (far past the 128 tokens embedded). Returns the count."""
    from esm_index.finetune import FIT_TEXTS
    from esm_index.index import REFERENCE_TEXTS

    held_out = held_out_texts(cache)
    texts = REFERENCE_TEXTS.read_text(encoding="utf-8").splitlines()
    for tid in common.task_ids(cache):
        data, _ = common.load_task(tid, cache)
        rows = np.random.default_rng(7).permutation(common.split(tid, len(data))[0])
        texts += [data.texts[i] for i in rows if data.texts[i] not in held_out][:per_task]
    one_line = (" ".join(t.split())[:max_chars] for t in texts if t not in held_out)
    kept = list(dict.fromkeys(t for t in one_line if t))
    FIT_TEXTS.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return len(kept)


@functools.lru_cache(maxsize=None)
def other_texts(cache: Path) -> list[str]:
    """The other kinds of text every map is fitted on besides its source's (the packaged
    ``fit_texts.txt``, which ``esm-index add`` uses too), less any task's held-out row.
    Computed once per process (it reads every task)."""
    from esm_index.finetune import FIT_TEXTS

    held_out = held_out_texts(cache)
    return [t for t in FIT_TEXTS.read_text(encoding="utf-8").splitlines() if t not in held_out]


def fit_one(embedder: Embedder, source: LabelledData, tuned, cfg: FinetuneConfig, out: Path, cache: Path,
            meta: dict, fidelity_from: Path | None = None) -> dict:
    """Steps 3-4: fit the ESM of fine-tuned encoder ``tuned`` (on the task's ``source`` rows and
    the packaged fit texts), write it with ``meta`` and the fidelity embeddings to ``out`` (copied
    from ``fidelity_from`` when that encoder's are there already); returns timings."""
    t1 = time.perf_counter()
    fit_texts = fit_sample(source, cfg)
    other = other_texts(cache)
    esm = esm_from_models(embedder, tuned, fit_texts, other_texts=other,
                          base=common.base_embeddings(embedder, fit_texts, cache),
                          other_base=common.base_embeddings(embedder, other, cache))
    t2 = time.perf_counter()
    tuned_embedder = embedder.with_model(tuned)
    fidelity = {}
    for fid in common.FIDELITY_TARGETS if fidelity_from is None else ():
        fdata, _ = common.load_task(fid, cache)
        _, f_idx = common.split(fid, len(fdata))
        fidelity[fid] = tuned_embedder.embed([fdata.texts[i] for i in f_idx]).astype(np.float16)
    t3 = time.perf_counter()
    esm.meta.update({**meta, "fit_seconds": round(t2 - t1, 1), "fidelity_seconds": round(t3 - t2, 1)})
    esm.save(out)
    if fidelity_from is None:
        np.savez(out / "fidelity.npz", **fidelity)
    elif fidelity_from.resolve() != (out / "fidelity.npz").resolve():
        shutil.copyfile(fidelity_from, out / "fidelity.npz")
    return {"fit_s": round(t2 - t1, 1), "fidelity_s": round(t3 - t2, 1), "heldout_mse": esm.meta["fit"]["heldout_mse"],
            "identity_mse": esm.meta["fit"]["identity_mse"], "fit_texts": esm.meta["fit_texts"]}


def build_one(embedder: Embedder, tid: str, cfg: FinetuneConfig, out: Path, cache: Path,
              fit: bool = True) -> dict:
    """Steps 1-5 above for one task (without ``fit``, steps 1, 2 and 5); returns its build record."""
    data, meta = common.load_task(tid, cache)
    tgt_idx = common.split(tid, len(data))[1]
    source = common.subset(data, common.source_rows(tid, data, cache))
    t0 = time.perf_counter()
    tuned = finetune(embedder, source, cfg)
    t1 = time.perf_counter()
    models = cache / "models" / tid
    shutil.rmtree(models, ignore_errors=True)
    tuned.save_pretrained(models, safe_serialization=True)
    steps = planned_steps(len(source), cfg)
    if not fit:
        return {"task": tid, "source_rows": len(source), "steps": steps, "finetune_s": round(t1 - t0, 1),
                "models_only": True}
    record = fit_one(embedder, source, tuned, cfg, out, cache, {
        "task_id": tid, "title": meta["name"], "language": meta["language"], "task_type": "classification",
        "label_names": meta["label_names"], "num_examples": len(source), "held_out_target_rows": len(tgt_idx),
        "provenance": f"{meta['source_package']}:{meta['source_path']}", "licence": meta["licence"],
        "text_column": "text", "label_column": "label", "base_model_name": embedder.spec.model_name,
        "embedding": embedder.spec.to_dict(),
        "finetune": {"steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                     "max_length": cfg.max_length, "max_passes": cfg.epochs, "seed": cfg.seed,
                     "examples_seen": steps * cfg.batch_size, "seconds": round(t1 - t0, 1)},
    })
    return {"task": tid, "source_rows": len(source), "target_rows": len(tgt_idx), "steps": steps,
            "finetune_s": round(t1 - t0, 1), **record, "total_s": round(time.perf_counter() - t0, 1)}


def refit_one(embedder: Embedder, tid: str, cfg: FinetuneConfig, out: Path, cache: Path) -> dict:
    """Steps 3-4 again from the kept encoder (no fine-tuning): a new ESM fit, same metadata."""
    from transformers import AutoModel

    from esm_index.esm import ESM

    old = ESM.load(cache / "pool" / tid).meta
    keep = {k: v for k, v in old.items() if k not in ("fit", "fit_texts", "fit_seconds", "fidelity_seconds",
                                                        DOMAIN_KEY)}
    t0 = time.perf_counter()
    data, _ = common.load_task(tid, cache)
    source = common.subset(data, common.source_rows(tid, data, cache))
    record = fit_one(embedder, source, AutoModel.from_pretrained(cache / "models" / tid), cfg, out, cache, keep,
                     fidelity_from=cache / "pool" / tid / "fidelity.npz")
    return {"task": tid, "refit": True, **record, "total_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=common.CACHE)
    r = POOL_RECIPE
    ap.add_argument("--steps", type=int, default=r.max_steps, help="optimizer steps per task (batch 32)")
    ap.add_argument("--max-passes", type=int, default=r.epochs, help="at most this many passes over a small task")
    ap.add_argument("--lr", type=float, default=r.lr)
    ap.add_argument("--max-length", type=int, default=r.max_length, help="fine-tuning truncation (CPU cap)")
    ap.add_argument("--fit-examples", type=int, default=r.fit_examples, help="source texts used to fit each ESM")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (one per worker when several run)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--model", type=Path, default=None, help="base model folder (default: the packaged MiniLM)")
    ap.add_argument("--refit", action="store_true",
                    help="refit every built task's ESM from its kept encoder (CACHE/models), no fine-tuning")
    ap.add_argument("--out", type=Path, default=None, help="where the ESM folders go (default CACHE/pool)")
    ap.add_argument("--models-only", action="store_true",
                    help="only fine-tune and keep each encoder (CACHE/models), no ESM: what the transfer study "
                         "needs, in about a third of the time; marked done in CACHE/models_built")
    ap.add_argument("--write-fit-texts", type=int, default=None, metavar="PER_TASK",
                    help="only write esm_index/fit_texts.txt (reference texts + PER_TASK source rows of each task)")
    args = ap.parse_args()
    if args.write_fit_texts is not None:
        print(f"{write_fit_texts(args.cache, args.write_fit_texts)} texts written")
        return

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    tids = [t for t in common.task_ids(args.cache) if not args.only or t in args.only]
    embedder = Embedder(args.model)
    cfg = replace(POOL_RECIPE, fit_examples=args.fit_examples, epochs=args.max_passes, max_steps=args.steps,
                  lr=args.lr, max_length=args.max_length)
    pool = args.out or args.cache / ("models_built" if args.models_only else "pool")
    log = pool / "_build_log.jsonl"  # "_": not matched by the README's pool/[a-z]* import glob
    for tid in tids:
        out = pool / tid
        if args.refit and not (args.cache / "models" / tid / "config.json").is_file():
            continue  # never built here: nothing to refit
        if args.models_only and (args.cache / "pool" / tid / "DONE").exists():
            continue  # a full build kept this encoder already
        if not claim(out):
            continue
        try:
            record = (refit_one(embedder, tid, cfg, out, args.cache) if args.refit else
                      build_one(embedder, tid, cfg, out, args.cache, fit=not args.models_only))
        except BaseException:
            (out / "CLAIM").unlink(missing_ok=True)
            raise
        (out / "DONE").write_text("ok\n")
        (out / "CLAIM").unlink(missing_ok=True)
        with open(log, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
