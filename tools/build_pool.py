#!/usr/bin/env python3
"""Fine-tune the base model on every prepared task and fit its ESM (the long job).

Reads the tasks written by ``tools/prepare_tasks.py`` (CACHE/tasks) and, for each task,
fine-tunes the packaged all-MiniLM-L6-v2 with the paper's recipe under CPU caps, fits the
ESM on up to ``--fit-examples`` of the task's texts, and writes CACHE/pool/<task>/ holding
the ESM in hfselect's format (model.safetensors + config.json with the task's metadata and
timings). For the fidelity study it also embeds a fixed probe sample of every task with the
fine-tuned encoder (probe_tuned.npy) - the "real fine-tuned embeddings" ESM-LogME imitates.

Resumable: a task whose folder has a DONE marker is skipped; a task interrupted mid-way is
redone. Then ``esm-index import indexes/default CACHE/pool/*`` makes the shipped index.

Usage: python tools/build_pool.py [--cache DIR] [--max-examples 600] [--max-length 64]
       [--epochs 3] [--fit-examples 3000] [--probe 200] [--only TASK ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esm_index.data import LabelledData, encode_labels  # noqa: E402
from esm_index.embed import Embedder  # noqa: E402
from esm_index.finetune import FinetuneConfig, finetune_and_fit  # noqa: E402

CACHE = Path(os.environ.get("ESM_INDEX_CACHE", Path.home() / ".cache" / "esm-index"))


def load_task(tasks_dir: Path, task_id: str) -> tuple[LabelledData, dict]:
    meta = json.loads((tasks_dir / f"{task_id}.meta.json").read_text())
    rows = [json.loads(line) for line in (tasks_dir / f"{task_id}.jsonl").open(encoding="utf-8")]
    labels, names = encode_labels([r["label"] for r in rows], "classification")
    return LabelledData([r["text"] for r in rows], labels, "classification", names), meta


def probe_sample(data: LabelledData, size: int, seed: int = 123) -> tuple[list[str], np.ndarray]:
    """A fixed random sample of a task (texts, labels), used as that task's fidelity target."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:size])
    return [data.texts[i] for i in idx], data.labels[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--max-examples", type=int, default=600, help="fine-tuning sample per task (CPU cap)")
    ap.add_argument("--max-length", type=int, default=64, help="fine-tuning truncation (CPU cap)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fit-examples", type=int, default=3000, help="texts used to fit each ESM")
    ap.add_argument("--probe", type=int, default=200, help="probe texts per task for the fidelity study")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--model", type=Path, default=None, help="base model folder (default: the packaged MiniLM)")
    args = ap.parse_args()

    tasks_dir, pool_dir = args.cache / "tasks", args.cache / "pool"
    task_ids = [t["id"] for t in json.loads((tasks_dir / "index.json").read_text())]
    if args.only:
        task_ids = [t for t in task_ids if t in args.only]
    embedder = Embedder(args.model)
    cfg = FinetuneConfig(max_examples=args.max_examples, fit_examples=args.fit_examples,
                         epochs=args.epochs, max_length=args.max_length)

    # Probe samples and their base embeddings: computed once, shared by every source.
    probes_path = pool_dir / "_probes"
    probes_path.mkdir(parents=True, exist_ok=True)
    all_ids = [t["id"] for t in json.loads((tasks_dir / "index.json").read_text())]
    probe = {}
    for tid in all_ids:
        probe[tid] = probe_sample(load_task(tasks_dir, tid)[0], args.probe)
        if not (probes_path / f"{tid}.npz").exists():
            np.savez(probes_path / f"{tid}.npz", base=embedder.embed(probe[tid][0]), labels=probe[tid][1])
    probe_order = list(probe)
    (probes_path / "order.json").write_text(json.dumps(probe_order))

    for i, tid in enumerate(task_ids, 1):
        out = pool_dir / tid
        if (out / "DONE").exists():
            print(f"[{i}/{len(task_ids)}] {tid}: done already", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        data, meta = load_task(tasks_dir, tid)
        t0 = time.perf_counter()
        esm, encoder = finetune_and_fit(embedder, data, cfg, progress=sys.stderr.isatty())
        tuned = embedder.with_model(encoder)
        esm.meta.update({"task_id": tid, "title": meta["name"], "language": meta["language"],
                         "label_names": meta["label_names"], "num_examples": len(data),
                         "provenance": f"{meta['source_package']}:{meta['source_path']}",
                         "licence": meta["licence"], "text_column": "text", "label_column": "label"})
        t1 = time.perf_counter()
        probe_tuned = np.stack([tuned.embed(probe[p][0]) for p in probe_order])
        esm.meta["probe_seconds"] = round(time.perf_counter() - t1, 1)
        esm.meta["total_seconds"] = round(time.perf_counter() - t0, 1)
        esm.save(out)
        np.save(out / "probe_tuned.npy", probe_tuned.astype(np.float16))
        (out / "DONE").write_text("ok\n")
        fit = esm.meta["fit"]
        print(f"[{i}/{len(task_ids)}] {tid}: {esm.meta['total_seconds']} s (fine-tune "
              f"{esm.meta['finetune']['seconds']} s), fit mse {fit['heldout_mse']:.5f} vs identity "
              f"{fit['identity_mse']:.5f}", flush=True)


if __name__ == "__main__":
    main()
