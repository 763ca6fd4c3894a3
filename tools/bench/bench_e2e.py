#!/usr/bin/env python3
"""The whole job in a fresh process, esm-index vs hfselect, same ESMs and same target.

Set-up (not timed): 500 ESM folders in hfselect's format (perturbations of the default
pool's real ESMs), an esm-index index holding the same 500 (float32, so the maps are
identical), and a target CSV of 1,000 real texts with 4 classes.

Timed, alternating, each in a fresh Python process, wall clock:
  hfselect:  import, load MiniLM + tokenizer, ESM.from_pretrained x 500, compute_scores
  esm-index: `esm-index rank target.csv --index IDX --exact --top 500 --json`
             with an empty embedding cache (so it embeds too)

Usage: python tools/bench/bench_e2e.py [--sources 500] [--rows 1000] [--repeats 3] [--root /tmp/esm-e2e]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shared import DEFAULT_POOL, sample_texts

HFSELECT_JOB = r"""
import sys, csv, os
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModel, AutoTokenizer
from datasets import Dataset as HFDataset
from hfselect.dataset import Dataset
from hfselect.esm import ESM
from hfselect.esm_logme import compute_scores
model_dir, esm_root, target = sys.argv[1:4]
rows = list(csv.DictReader(open(target, encoding="utf-8")))
data = Dataset(HFDataset.from_dict({"text": [r["text"] for r in rows], "label": [int(r["label"]) for r in rows]}),
               text_col="text", label_col="label", is_regression=False)
model, tokenizer = AutoModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
esms = [ESM.from_pretrained(os.path.join(esm_root, f)) for f in sorted(os.listdir(esm_root))]
scores = compute_scores(data, model, esms, tokenizer, batch_size=128, device_name="cpu")
print(len(scores), max(scores))
"""


def setup(root: Path, sources: int, rows: int) -> tuple[Path, Path, Path, Path]:
    from esm_index.embed import default_model_path
    from esm_index.esm import ESM
    from esm_index.index import SourceIndex

    esm_root, index_dir, target = root / "esms", root / "index", root / "target.csv"
    link = root / "sentence-transformers-all-MiniLM-L6-v2"  # hfselect mean-pools only for such names
    if not link.exists():
        root.mkdir(parents=True, exist_ok=True)
        link.symlink_to(default_model_path())
    if not (index_dir / "store.lmdb").exists():
        with SourceIndex(DEFAULT_POOL, readonly=True) as pool:
            _, w, b = pool.store.esms(pool.store.ids())
        rng = np.random.default_rng(0)
        items = []
        for i in range(sources):
            j = i % len(w)
            esm = ESM(w[j] + rng.standard_normal(w.shape[1:]) * 0.002, b[j], {"task_id": f"src{i:04d}"})
            esm.save(esm_root / f"src{i:04d}")
            items.append((f"src{i:04d}", esm))
        shutil.rmtree(index_dir, ignore_errors=True)
        with SourceIndex.create(index_dir, esm_dtype="float32") as index:
            index.add_esms(items)
            index.rebuild()
    if not target.exists():
        texts, labels = sample_texts()
        idx = np.random.default_rng(1).permutation(np.resize(np.arange(len(texts)), rows))
        with open(target, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for k, i in enumerate(idx):  # repeated texts get a suffix so the rows stay distinct
                writer.writerow([texts[i] + ("" if k < len(texts) else f" ({k})"), labels[i]])
    return link, esm_root, index_dir, target


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=500)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path("/tmp/esm-e2e"))
    args = ap.parse_args()
    link, esm_root, index_dir, target = setup(args.root, args.sources, args.rows)
    esm_index_bin = str(Path(sys.executable).with_name("esm-index"))
    results = {"hfselect": [], "esm-index": []}
    for _ in range(args.repeats):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        results["hfselect"].append(timed([sys.executable, "-c", HFSELECT_JOB, str(link), str(esm_root), str(target)],
                                         {**env, "TQDM_DISABLE": "1"}))
        with tempfile.TemporaryDirectory() as cache:
            results["esm-index"].append(timed([esm_index_bin, "rank", str(target), "--index", str(index_dir), "--text-col",
                                               "text", "--label-col", "label", "--exact", "--top", str(args.sources),
                                               "--json"], {**env, "ESM_INDEX_CACHE": cache}))
        print(f"hfselect {results['hfselect'][-1]:.1f} s, esm-index {results['esm-index'][-1]:.1f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in results.items()}
    print(json.dumps({"sources": args.sources, "rows": args.rows, "median_s": med,
                      "ratio": round(med["hfselect"] / med["esm-index"], 2), "runs": results}))


if __name__ == "__main__":
    main()
