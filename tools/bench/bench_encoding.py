#!/usr/bin/env python3
"""Compact ESM encodings, measured on the real shipped pool and real targets (issue 12, item 2).

For each candidate encoding of a map [W, b] (D x (d+1)) this reports the bytes per source and,
against the float32 maps the pool was built from (CACHE/pool/<task>, or the index's own maps
with ``--reference index``), the largest absolute change of an exact ESM-LogME score over every
(source, target) pair, and for how many targets the exact top-5 (as an ordered list) is
unchanged, by ESM-LogME alone and by the default "combined" ranking; also the largest relative
change of a metric [W,b]^T [W,b] (all the scorer sees of a map) and, for the store's
encodings, the milliseconds to encode (import) and decode (every read) a map. The smallest gap
between neighbours of a target's exact top-6 is printed too: a score change well below it
cannot reorder a top-5.

Targets: each pool task's held-out rows (``common.split``, at most 500, never fitted on; n > D,
the feature side of the scorer), a fixed 150-row subset of each (n < D, the kernel side) and
the three shipped sample targets (indexes/samples). Embeddings come from (and go to) the
content-hashed cache CACHE/base, so only a first run embeds (about two minutes on 2 cores).

Candidates: the store's encodings (``esm_index.encoding``: what ``esm-index init --dtype``
offers, float16-factor the one this measurement chose) and experimental ones defined here:
int8 of W - I, of [W, b], of the factor R - I or of the SVD factor S V^T (each with a scale
per row), int4 of W - I, and I + low-rank W - I. The factors are rotations of the map: the
scorer sees a map only through [W,b]^T [W,b], so they are score-equivalent up to rounding.

Usage: python tools/bench/bench_encoding.py [--index indexes/default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import shared  # noqa: F401  (sys.path and HF_HUB_OFFLINE)
from common import CACHE, SAMPLES, base_embeddings, load_task, split, task_ids

SUBSET = 150  # rows of the small (kernel-side) version of each held-out target


# ---- experimental candidates (not in the store) ------------------------------------------------
def _int_rows(a: np.ndarray, bits: int) -> np.ndarray:
    """a with each row rounded to a symmetric ``bits``-bit grid scaled to the row's largest |value|."""
    top = 2 ** (bits - 1) - 1
    scale = np.abs(a).max(axis=-1, keepdims=True) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return (np.clip(np.rint(a / scale), -top, top) * scale).astype(np.float32)


def _eye(w: np.ndarray) -> np.ndarray:
    return np.eye(*w.shape, dtype=np.float32)


def _augmented(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.hstack([w, b[:, None]]).astype(np.float64)


def triangular(w: np.ndarray, b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The store's float16-factor with R - I rounded to ``bits`` per row instead of float16."""
    r = np.linalg.qr(_augmented(w, b), mode="r")
    r = r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]  # near I, not near -I
    eye = np.eye(*r.shape)
    r = np.triu(_int_rows((r - eye).astype(np.float32), bits) + eye)
    return r[:, :-1].astype(np.float32), r[:, -1].astype(np.float32)


def int_rows(w: np.ndarray, b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """[W, b] itself rounded to ``bits`` per row."""
    aug = _int_rows(_augmented(w, b).astype(np.float32), bits)
    return aug[:, :-1], aug[:, -1]


def singular_factor(w: np.ndarray, b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """[W, b] = U S V^T replaced by S V^T (same metric, not the same map), each row rounded to
    ``bits`` on its own scale: a direction's error is relative to its own singular value."""
    _, s, vt = np.linalg.svd(_augmented(w, b), full_matrices=False)
    factor = _int_rows((s[:, None] * vt).astype(np.float32), bits)
    return factor[:, :-1], factor[:, -1]


def low_rank(w: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """I + the best rank-``rank`` approximation of W - I (factors in float16), b in float16."""
    u, s, vt = np.linalg.svd(w.astype(np.float64) - _eye(w), full_matrices=False)
    left = (u[:, :rank] * s[:rank]).astype(np.float16).astype(np.float32)
    right = vt[:rank].astype(np.float16).astype(np.float32)
    return _eye(w) + left @ right, b.astype(np.float16).astype(np.float32)


def candidates(out_dim: int, dim: int) -> dict:
    """name -> (bytes per source, round trip (W, b) -> (W', b') in float32, what it is)."""
    from esm_index.encoding import ENCODINGS

    store = {name: (enc.nbytes(out_dim, dim), lambda w, b, enc=enc: enc.decode(enc.encode(w, b), out_dim, dim),
                    f"store encoding: {enc.description}") for name, enc in ENCODINGS.items()}
    tri = out_dim * (dim + 1) - out_dim * (out_dim - 1) // 2  # entries of an upper trapezoidal D x (d+1)
    experimental = {
        "int8-delta": (out_dim * dim + 6 * out_dim,
                       lambda w, b: (_eye(w) + _int_rows(w - _eye(w), 8), b.astype(np.float16).astype(np.float32)),
                       "W - I in int8 with a float32 scale per row, b in float16"),
        "int8-rows": (out_dim * (dim + 1) + 4 * out_dim,
                      lambda w, b: int_rows(w, b, 8),
                      "[W, b] itself (not W - I) in int8 with a float32 scale per row"),
        "tri-int8": (tri + 4 * out_dim, lambda w, b: triangular(w, b, 8),
                     "R of [W,b] = QR, R - I in int8 with a float32 scale per row"),
        "svd-int8": (out_dim * (dim + 1) + 4 * out_dim, lambda w, b: singular_factor(w, b, 8),
                     "S V^T of [W,b] = U S V^T (same metric, not the same map) in int8, a float32 scale per row"),
        "int4-delta": ((out_dim * (dim + 1) + 1) // 2 + 4 * out_dim,
                       lambda w, b: (_eye(w) + _int_rows(w - _eye(w), 4), _int_rows(b[None], 4)[0]),
                       "W - I and b in int4 (packed), a float32 scale per row (b one row)"),
    }
    for rank in (32, 96):
        experimental[f"lowrank-{rank}"] = (2 * rank * (out_dim + dim) + 2 * out_dim,
                                          lambda w, b, rank=rank: low_rank(w, b, rank),
                                          f"I + rank-{rank} SVD of W - I (float16 factors), b in float16")
    return {**store, **experimental}


# ---- targets ---------------------------------------------------------------------------------
class _LazyEmbedder:
    def __init__(self, index) -> None:
        self.index, self.spec = index, index.spec

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.index.embedder.embed(texts)


def real_targets(index, tasks: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, base embeddings, dense labels) of every held-out target, its 150-row subset and
    the three samples."""
    from esm_index.data import read_table

    embedder, out = _LazyEmbedder(index), []
    dense = lambda labels: np.unique(labels, return_inverse=True)[1]  # noqa: E731
    for tid in tasks:
        data, _ = load_task(tid)
        _, held = split(tid, len(data))
        x, y = base_embeddings(embedder, [data.texts[i] for i in held]), dense(data.labels[held])
        out.append((tid, x, y))
        pick = np.sort(np.random.default_rng(0).permutation(len(held))[:SUBSET])
        if len(held) > SUBSET:
            out.append((f"{tid}[{SUBSET}]", x[pick], dense(y[pick])))
    for csv in sorted(SAMPLES.glob("*.csv")):
        rows = read_table(csv)
        out.append((csv.name, base_embeddings(embedder, [r["text"] for r in rows]),
                    dense(np.asarray([r["label"] for r in rows]))))
    return out


def metric_change(w: np.ndarray, b: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> float:
    """max |M' - M| / max |M| of the metrics M = [W,b]^T [W,b]: what the scorer sees of a map."""
    m, m2 = (_augmented(*p).T @ _augmented(*p) for p in ((w, b), (w2, b2)))
    return float(np.abs(m2 - m).max() / np.abs(m).max())


def codec_ms(encoding, w: np.ndarray, b: np.ndarray, repeats: int = 3) -> dict:
    """Milliseconds per map to encode (an import pays it) and to decode (every read pays it)."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        raws = [encoding.encode(wi, bi) for wi, bi in zip(w, b)]
    t1 = time.perf_counter()
    for _ in range(repeats):
        [encoding.decode(raw, *w.shape[1:]) for raw in raws]
    t2 = time.perf_counter()
    return {"encode_ms": 1000 * (t1 - t0) / repeats / len(w), "decode_ms": 1000 * (t2 - t1) / repeats / len(w)}


def top5(scores: np.ndarray) -> list[int]:
    return np.argsort(-scores, kind="stable")[:5].tolist()


def build_and_compare(folder: Path, encoding: str, shipped, esms: list, names: list[str], targets: list) -> dict:
    """Import ``esms`` (the pool's float32 maps) under ``names`` into a new index at ``folder``
    stored in ``encoding``, and count the targets whose top-5 by the default query, and by
    ``--exact``, is the shipped index's (float16, the same maps)."""
    from esm_index.index import SourceIndex

    t0 = time.perf_counter()
    with SourceIndex.create(folder, esm_dtype=encoding) as index:
        t1 = time.perf_counter()
        index.add_esms(zip(names, esms))
        index.rebuild()
        t2 = time.perf_counter()
        same = {"default": 0, "exact": 0}
        for _, x, y in targets:
            for mode, options in (("default", {}), ("exact", {"exact": True})):
                top = [[r.source for r in ix.rank_embeddings(x, y, top=5, **options).results] for ix in (index, shipped)]
                same[mode] += top[0] == top[1]
        out = {"encoding": encoding, "lmdb_bytes": index.store.disk_bytes(),
               "shipped_lmdb_bytes": shipped.store.disk_bytes(), "create_s": t1 - t0, "import_rebuild_s": t2 - t1,
               "same_top5_default": same["default"], "same_top5_exact": same["exact"], "targets": len(targets)}
    print(f"\nbuilt {folder} in {encoding}: LMDB {out['lmdb_bytes']:,} B (shipped float16 index "
          f"{out['shipped_lmdb_bytes']:,} B); import + rebuild {out['import_rebuild_s']:.1f} s; top-5 as the shipped "
          f"index's for {same['default']}/{len(targets)} targets (default query), {same['exact']}/{len(targets)} (--exact)")
    return out


def main() -> None:
    import torch

    from esm_index.domain import combine, similarities
    from esm_index.encoding import ENCODINGS
    from esm_index.esm import ESM
    from esm_index.index import SourceIndex
    from esm_index.logme import TargetStats, score_esms

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=shared.REPO / "indexes" / "default")
    ap.add_argument("--pool", type=Path, default=CACHE / "pool", help="the float32 ESM folders the index was built from")
    ap.add_argument("--reference", choices=["pool", "index"], default="pool",
                    help="compare against the float32 pool folders, or the index's own (float16) maps")
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all)")
    ap.add_argument("--build", type=Path, default=None,
                    help="also import the pool into a new index in --build-encoding here (the product's path), and "
                         "compare its rankings (default query and --exact) with the shipped index's")
    ap.add_argument("--build-encoding", default="float16-factor")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    index = SourceIndex(args.index, readonly=True)
    ids = index.store.ids()
    metas = index.store.metas(ids)
    names = [m["name"] for m in metas]
    if args.reference == "pool":
        esms = [ESM.load(args.pool / m.get("task_id", m["name"])) for m in metas]
    else:
        esms = [index.get_esm(name) for name in names]
    w, b = np.stack([e.weight for e in esms]), np.stack([e.bias for e in esms])
    tasks = [t for t in task_ids() if t in {m.get("task_id") for m in metas}]
    targets = real_targets(index, tasks)
    stats = [TargetStats.from_embeddings(x, y) for _, x, y in targets]
    domain = [similarities(x, metas) for _, x, _ in targets]
    print(f"{len(names)} sources ({args.reference} maps as reference), {len(targets)} targets "
          f"(n = {min(len(x) for _, x, _ in targets)}-{max(len(x) for _, x, _ in targets)})", flush=True)

    def scores(wc: np.ndarray, bc: np.ndarray) -> np.ndarray:
        wt, bt = torch.from_numpy(np.ascontiguousarray(wc)), torch.from_numpy(np.ascontiguousarray(bc))
        return np.stack([score_esms(st, wt, bt) for st in stats])  # (targets, sources)

    ref = scores(w, b)
    ref_combined = [combine(ref[j], domain[j], "combined") for j in range(len(targets))]
    gaps = []  # (gap, target, ranking, rank of the upper neighbour)
    for j, (name, _, _) in enumerate(targets):
        for method, s in (("ESM-LogME", ref[j]), ("combined", ref_combined[j])):
            top = np.sort(s)[::-1][:6]
            k = int(np.argmin(top[:-1] - top[1:]))
            gaps.append((float(top[k] - top[k + 1]), name, method, k + 1))
    low = min(gaps)
    print(f"smallest gap between neighbours of a target's exact top-6: {low[0]:.2e} ({low[1]}, {low[2]}, "
          f"#{low[3]} and #{low[3] + 1}); median over targets {np.median([g[0] for g in gaps]):.2e}")

    out_dim, dim = w.shape[1:]
    rows = []
    for name, (nbytes, roundtrip, what) in candidates(out_dim, dim).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        decoded = [roundtrip(w[i], b[i]) for i in range(len(w))]
        seconds = (time.perf_counter() - t0) / len(w)
        timing = codec_ms(ENCODINGS[name], w, b) if name in ENCODINGS else {}
        got = scores(np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded]))
        same_logme = sum(top5(got[j]) == top5(ref[j]) for j in range(len(targets)))
        same_comb = sum(top5(combine(got[j], domain[j], "combined")) == top5(ref_combined[j])
                        for j in range(len(targets)))
        rel = max(metric_change(w[i], b[i], *d) for i, d in enumerate(decoded))
        rows.append({"encoding": name, "bytes": int(nbytes), "max_score_change": float(np.abs(got - ref).max()),
                     "same_top5_esm_logme": same_logme, "same_top5_combined": same_comb, "targets": len(targets),
                     "max_metric_change": rel, "roundtrip_ms": 1000 * seconds, **timing, "what": what})
        print(f"{name}: {nbytes:,} B, max score change {rows[-1]['max_score_change']:.2e}, same top-5 "
              f"{same_logme}/{len(targets)} (ESM-LogME), {same_comb}/{len(targets)} (combined)", flush=True)

    print("\n| encoding | bytes / source | vs float16 | largest score change | same top-5, ESM-LogME | "
          "same top-5, combined | largest metric change | encode / decode ms | what |")
    print("|---|---|---|---|---|---|---|---|---|")
    f16 = 2 * out_dim * (dim + 1)
    for r in rows:
        print(f"| {r['encoding']} | {r['bytes']:,} | {r['bytes'] / f16:.2f}x | {r['max_score_change']:.1e} | "
              f"{r['same_top5_esm_logme']}/{r['targets']} | {r['same_top5_combined']}/{r['targets']} | "
              f"{r['max_metric_change']:.1e} | "
              + (f"{r['encode_ms']:.2f} / {r['decode_ms']:.2f}" if "encode_ms" in r else "") + f" | {r['what']} |")
    built = build_and_compare(args.build, args.build_encoding, index, esms, names, targets) if args.build else None
    if args.json:
        args.json.write_text(json.dumps({"sources": len(names), "targets": [t for t, _, _ in targets],
                                         "gaps": gaps, "rows": rows, "built": built}, indent=1))


if __name__ == "__main__":
    main()
