#!/usr/bin/env python3
"""Peak memory and wall time of the full-pool commands, each in a fresh process, for two
checkouts side by side ("before": another checkout, e.g. /work/main; "after": this one).

For each pool size N it grows the synthetic pool ``POOLS/pool-N`` (shared.grow_pool:
mixtures of the shipped pool's real maps, resumable; they have no domain vectors, so there
"combined" ranks as "esm-logme" and "domain" is refused), and for each ``--index`` folder
(e.g. the shipped pool, whose sources have domain vectors) it uses it as it is; it runs,
per checkout asked for,

    rank     esm-index rank SAMPLE --index POOL --exact --json --top N --method M
             for each sample target of indexes/samples and each method; the target's
             embeddings are cached first (not measured), so a run is start-up + the scan
    export   esm-index export POOL TMP (the folder deleted after)
    reprobe  esm-index rebuild POOL --reprobe (rewrites the pool's summaries and FAISS files)
    verify   esm-index verify POOL (reads every map; exit 1 where the pool has no FAISS files)

A command's peak RSS is its own, from ``/usr/bin/time`` (ru_maxrss of a child that time
forks: a child of this Python process would inherit this process's peak; it counts the
pages of LMDB's memory map the command holds as well as its arrays). With both checkouts,
the rank runs must give the same results (every source, every score, bit for bit, since
``--top N`` lists the whole pool, or the same refusal); the script says which ones differ.

Usage: python tools/bench/bench_memory.py --sizes 2000 --index indexes/default --before /work/main
       python tools/bench/bench_memory.py --sizes 10000 --ops rank export reprobe --before /work/main --skip-before rank
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import shared
from esm_index.data import read_table  # noqa: E402 - shared puts the checkout on sys.path
from esm_index.index import SourceIndex  # noqa: E402

METHODS = ("combined", "esm-logme", "domain")
SAMPLE_NAMES = ("movie_reviews", "news_topics", "sms_spam")


def measured(checkout: Path, args: list[str]) -> dict:
    """Run ``python -m esm_index ARGS`` with ``checkout`` first on the path; its peak RSS
    (GB), wall seconds, exit code and stdout."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        usage = Path(tmp) / "usage"
        done = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", str(usage), sys.executable, "-m", "esm_index",
                               *args], capture_output=True, text=True, env=env, cwd=checkout)
        kb, wall = usage.read_text().split()[-2:]
    return {"peak_rss_gb": round(int(kb) / 1e6, 3), "wall_s": float(wall), "rc": done.returncode,
            "stdout": done.stdout}


def cache_targets(pool: Path) -> None:
    """Embed the samples once (the cache the rank runs read), outside the measurements."""
    with SourceIndex(pool, readonly=True) as index:
        for name in SAMPLE_NAMES:
            index.embed([r["text"] for r in read_table(shared.SAMPLES / f"{name}.csv")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000])
    ap.add_argument("--index", type=Path, nargs="*", default=[], help="existing pools, used as they are")
    ap.add_argument("--pools", type=Path, default=Path("/tmp/esm-bench"), help="where pool-N folders live")
    ap.add_argument("--before", type=Path, default=None, help="the checkout to compare with (e.g. /work/main)")
    ap.add_argument("--skip-before", nargs="*", default=[], help="ops not run with --before (too large for it)")
    ap.add_argument("--ops", nargs="+", default=["rank"], choices=["rank", "export", "reprobe", "verify"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--samples", nargs="+", default=list(SAMPLE_NAMES), choices=SAMPLE_NAMES)
    args = ap.parse_args()
    checkouts = {"after": shared.REPO}
    if args.before:
        checkouts = {"before": args.before.resolve(), **checkouts}
    rows, differ = [], []
    pools = [(args.pools / f"pool-{n}", n) for n in args.sizes]
    for folder in args.index:
        with SourceIndex(folder, readonly=True) as index:
            pools.append((folder.resolve(), len(index)))
    for pool, n in pools:
        if pool.name == f"pool-{n}":
            shared.grow_pool(pool, n, progress=True)
        cache_targets(pool)
        for op in args.ops:
            runs: list[tuple[str, list[str]]] = []
            if op == "rank":
                runs = [(f"rank {s} {m}", ["rank", str(shared.SAMPLES / f"{s}.csv"), "--index", str(pool),
                                            "--text-col", "text", "--label-col", "label", "--exact", "--json",
                                            "--top", str(n), "--method", m])
                        for s in args.samples for m in args.methods]
            elif op == "export":
                runs = [("export", ["export", str(pool), str(args.pools / "export-tmp")])]
            elif op == "verify":
                runs = [("verify", ["verify", str(pool)])]
            else:
                runs = [("rebuild --reprobe", ["rebuild", str(pool), "--reprobe"])]
            for what, command in runs:
                got = {}
                for label, checkout in checkouts.items():
                    if label == "before" and op in args.skip_before:
                        continue
                    got[label] = measured(checkout, command)
                    shutil.rmtree(args.pools / "export-tmp", ignore_errors=True)
                    row = {"pool": pool.name, "sources": n, "command": what, "code": label,
                           **{k: v for k, v in got[label].items() if k != "stdout"}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if op == "rank" and len(got) == 2:
                    results = [json.loads(r["stdout"])["results"] if r["rc"] == 0 else r["rc"] for r in got.values()]
                    same = results[0] == results[1]
                    print(json.dumps({"pool": pool.name, "command": what, "identical_rankings": same,
                                      "results_compared": results[0] if isinstance(results[0], int) else
                                      len(results[0])}), flush=True)
                    if not same:
                        differ.append(what)
    print("\n| pool | sources | command | code | peak RSS | wall |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pool']} | {r['sources']:,} | {r['command']} | {r['code']} | {r['peak_rss_gb']:.2f} GB | {r['wall_s']:.0f} s"
              + ("" if r["rc"] == 0 else f" (exit {r['rc']})") + " |")
    if args.before and "rank" in args.ops:
        print("\nrankings " + ("differ: " + ", ".join(differ) if differ else "identical (every source, bit for bit)"))


if __name__ == "__main__":
    main()
