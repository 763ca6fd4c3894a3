#!/usr/bin/env python3
"""The warm service against local mode, in one run, on a synthetic pool (loopback only).

Measures, each as the whole CLI command a user types (process start to exit, wall clock):
  * local mode, ``esm-index rank FILE --index POOL --json``: the first run (embeds the target)
    and later runs with the target's embeddings cached;
  * client mode, the same command with ``--server URL``: p50 / p95 with a cached target, and
    new 300-text targets (texts the cache has never seen), split into the server's embedding
    time and the rest;
  * 8 concurrent clients (threads of ``esm_index.Client``) for a fixed time: requests, errors,
    throughput, latency, and the server's peak RSS (VmHWM).

Bounded: every loop has a count and the whole run a deadline; the server is stopped with
SIGTERM at the end (or on any error). The pool is built once under --root (never in the repo)
from the shipped pool's ESMs, as tools/bench/bench_query.py builds its pools.

    python tools/bench/bench_serve.py --root /tmp/esm-serve-bench --sources 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared import REPO, SAMPLES, grow_pool

CLI = [sys.executable, "-m", "esm_index.cli"]
TARGET = SAMPLES / "movie_reviews.csv"


def build_pool(folder: Path, n: int) -> None:
    """N synthetic sources (mixtures of the shipped pool's real ESMs), resumable."""
    from esm_index.index import SourceIndex

    grow_pool(folder, n, progress=True)
    with SourceIndex(folder) as index:
        index.rebuild()


def timed(cmd: list[str], env: dict) -> tuple[float, dict]:
    """Wall seconds of one whole command (process start to exit) and its --json output."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return wall, json.loads(out.stdout)


def rank_cmd(target: Path, pool: Path, server: str | None = None) -> list[str]:
    return CLI + ["rank", str(target), "--index", str(pool), "--text-col", "text", "--label-col", "label",
                  "--top", "5", "--json"] + (["--server", server] if server else [])


def new_target(folder: Path, k: int) -> Path:
    """The sample target with every text made new (a suffix), so no cache has seen it."""
    from esm_index.data import read_table

    rows = read_table(TARGET)
    path = folder / f"new-{k}-{time.time_ns()}.jsonl"
    with open(path, "w") as fh:
        for i, r in enumerate(rows):
            fh.write(json.dumps({"text": f"{r['text']} (v{k}.{i})", "label": r["label"]}) + "\n")
    return path


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e6, 2)
    return float("nan")


def concurrent(url: str, pool: Path, clients: int, seconds: float) -> dict:
    """``clients`` threads, each ranking the (cached) sample targets in a loop for ``seconds``."""
    from esm_index.client import Client
    from esm_index.data import read_table

    targets = []
    for name in ("movie_reviews", "news_topics", "sms_spam"):
        rows = read_table(SAMPLES / f"{name}.csv")
        targets.append(([r["text"] for r in rows], [r["label"] for r in rows]))
    client = Client(url, index=str(pool))
    for texts, labels in targets:  # embed once, so the loop measures cached queries
        client.rank(texts, labels, None, top=5)
    latencies, errors = [], []
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        rng = random.Random(k)
        while time.perf_counter() < stop:
            texts, labels = rng.choice(targets)
            t0 = time.perf_counter()
            try:
                client.rank(texts, labels, None, top=5)
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(repr(exc)[:200])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 600)
    wall = time.perf_counter() - t0
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "throughput_per_s": round(len(latencies) / wall, 2),
            "latency_p50_s": pct(latencies, 0.5) if latencies else None,
            "latency_p95_s": pct(latencies, 0.95) if latencies else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/esm-serve-bench"))
    ap.add_argument("--sources", type=int, default=10_000)
    ap.add_argument("--local-runs", type=int, default=3, help="local-mode commands with a cached target")
    ap.add_argument("--client-runs", type=int, default=15, help="client commands with a cached target")
    ap.add_argument("--new-targets", type=int, default=3, help="client commands with a new 300-text target")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of the concurrent phase")
    ap.add_argument("--deadline", type=float, default=1800.0, help="give up after this many seconds")
    args = ap.parse_args()
    started = time.perf_counter()
    pool = args.root / f"pool-{args.sources}"
    args.root.mkdir(parents=True, exist_ok=True)
    print(f"pool {pool} (built or completed if needed)", file=sys.stderr)
    build_pool(pool, args.sources)
    cache = args.root / f"cache-{time.time_ns()}"  # a fresh embedding cache: the first run embeds
    env = {**os.environ, "ESM_INDEX_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    report: dict = {"sources": args.sources, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                    f"load average {os.getloadavg()[0]:.1f} at start", "target": TARGET.name}

    def check_deadline() -> None:
        if time.perf_counter() - started > args.deadline:
            raise TimeoutError(f"over the {args.deadline} s deadline")

    first, out = timed(rank_cmd(TARGET, pool), env)
    local = []
    for _ in range(args.local_runs):
        check_deadline()
        local.append(timed(rank_cmd(TARGET, pool), env))
    report["local"] = {"first_run_s": round(first, 2), "first_run_timings": out["timings"],
                       "cached_runs_s": [round(w, 2) for w, _ in local],
                       "cached_p50_s": pct([w for w, _ in local], 0.5), "cached_timings_example": local[-1][1]["timings"]}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = subprocess.Popen(CLI + ["serve", "--index", f"pool={pool}", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        from esm_index.client import Client, ServiceError

        while True:
            try:
                Client(url).health()
                break
            except ServiceError:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
                check_deadline()
                time.sleep(0.25)
        report["server_start_s"] = round(time.perf_counter() - t0, 2)
        client = []
        for _ in range(args.client_runs):
            check_deadline()
            client.append(timed(rank_cmd(TARGET, pool, url), env))
        report["client_cached"] = {"runs": len(client), "p50_s": pct([w for w, _ in client], 0.5),
                                   "p95_s": pct([w for w, _ in client], 0.95),
                                   "timings_example": client[len(client) // 2][1]["timings"]}
        fresh = []
        for k in range(args.new_targets):
            check_deadline()
            wall, out = timed(rank_cmd(new_target(args.root, k), pool, url), env)
            fresh.append({"wall_s": round(wall, 2), "embed_s": out["timings"]["embed"],
                          "rest_s": round(wall - out["timings"]["embed"], 2)})
        report["client_new_300_text_target"] = fresh
        check_deadline()
        report["concurrent"] = concurrent(url, pool, args.clients, args.seconds)
        report["concurrent"]["server_peak_rss_gb"] = peak_rss_gb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            report["server_exit"] = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            report["server_exit"] = "killed after 60 s"
        for path in args.root.glob("new-*.jsonl"):
            path.unlink()
    report["load_average_at_end"] = round(os.getloadavg()[0], 1)
    report["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
