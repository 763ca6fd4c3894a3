"""Experiment: do non-linear maps carry what the linear ESMs cannot?

The session-13 transfer study found that a leave-one-out ridge classifier on each source's
*real* fine-tuned embeddings of a target orders the sources well (regret@3 0.90), while the
same classifier on the ESM-mapped embeddings does not (2.12). A linear map cannot change what
a linear classifier separates (only its shrinkage), so no linear ESM can carry that signal.
This script asks whether a small non-linear map can: for each candidate source it fits,
on the same pairs the shipped maps are fitted on (the source's fit rows and the packaged fit
texts), a ridge map (as the build does) and a ridge map plus a residual MLP on what the
ridge leaves, then scores every transfer target through both and through the real encoder.
A third kind, "noise", asks a cheaper question: is the real ranking closer to the mapped
embeddings plus what the map leaves out, drawn as Gaussian noise with the covariance of the
ridge's residual on held-out fit pairs (LogME averaged over 3 draws)? That is what the real
embeddings look like if the residual carries nothing about the target:

* fidelity: Spearman and top-1 agreement of LogME (and of ridge LOO accuracy) through a map
  against the same on the real fine-tuned embeddings, over each target's candidates;
* transfer: regret@3 of each ranking against the study's probe accuracies.

Nothing here changes the product. The real fine-tuned embeddings of the fit texts are cached
in CACHE/nonlinear (from build_pool.py's encoders, about 6 min a source on one thread); the
real encoders' scores of the targets come from transfer_report.py's rankings cache.

    python tools/nonlinear_maps.py [--hidden 1024] [--fit-rows 1500] [--threads 2] [--kinds ridge,mlp,noise]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from build_pool import other_texts  # noqa: E402
from transfer_bench import TARGETS, candidates, load_target, target_split  # noqa: E402
from transfer_report import accuracies, cached_rankings, random_regret, regret, ridge_loo_accuracy  # noqa: E402

from esm_index.esm import fit_ridge  # noqa: E402
from esm_index.finetune import POOL_RECIPE, fit_sample  # noqa: E402
from esm_index.logme import logme  # noqa: E402

OUT = common.CACHE / "nonlinear"


def cached(path: Path, compute) -> np.ndarray:
    if path.is_file():
        return np.load(path).astype(np.float32)
    arr = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr.astype(np.float16))
    return arr.astype(np.float16).astype(np.float32)


def fit_texts(source: str, rows: int) -> list[str]:
    """The texts a source's map is fitted on, as build_pool.py picks them: up to ``rows`` of
    its own source rows and the packaged fit texts."""
    data, _ = common.load_task(source)
    src = common.subset(data, common.source_rows(source, data))
    return fit_sample(src, replace(POOL_RECIPE, fit_examples=rows)) + other_texts(common.CACHE)


class ResidualMLP:
    """y = ridge(x) + MLP(x): the MLP (one hidden GELU layer, output started at zero) learns
    what the ridge map leaves, by AdamW on the MSE, stopped at the best error on a tenth of
    the pairs it holds out (the ridge map is fitted on all pairs, as the build's is)."""

    def __init__(self, ridge, base: np.ndarray, tuned: np.ndarray, hidden: int, epochs: int = 400, seed: int = 0,
                 lr: float = 1e-3):
        import torch

        torch.manual_seed(seed)
        self.ridge = ridge
        resid = tuned - self.ridge.apply(base)
        x, y = torch.from_numpy(base.astype(np.float32)), torch.from_numpy(resid.astype(np.float32))
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
        val, tr = perm[: len(x) // 10], perm[len(x) // 10:]
        d = x.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, y.shape[1]))
        torch.nn.init.zeros_(net[2].weight)
        torch.nn.init.zeros_(net[2].bias)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
        best, best_state, self.val_curve = float(((y[val]) ** 2).mean()), None, []
        zero = best
        for epoch in range(epochs):
            for b in torch.split(tr[torch.randperm(len(tr))], 256):
                loss = ((net(x[b]) - y[b]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                v = float(((net(x[val]) - y[val]) ** 2).mean())
            self.val_curve.append(v)
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in net.state_dict().items()}
            elif epoch - int(np.argmin(self.val_curve)) > 20:
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.net, self.resid_gain = net.eval(), 1 - best / zero  # share of the ridge's residual removed, on the MLP's held-out pairs

    def apply(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.ridge.apply(x) + self.net(torch.from_numpy(x.astype(np.float32))).numpy()


class NoisyRidge:
    """The ridge map plus Gaussian noise shaped like its residual: the residual's covariance
    is measured on a fifth of the pairs held out from a ridge fitted on the rest (an in-sample
    residual is smaller than what the map leaves on new texts); the map itself is fitted on
    all pairs, as the build's is. ``draws`` returns that many noisy copies, seeded."""

    def __init__(self, ridge, base: np.ndarray, tuned: np.ndarray, seed: int = 0):
        self.ridge = ridge
        perm = np.random.default_rng(seed).permutation(len(base))
        val, tr = perm[: len(base) // 5], perm[len(base) // 5:]
        resid = tuned[val] - fit_ridge(base[tr], tuned[tr]).apply(base[val])
        evals, evecs = np.linalg.eigh(np.cov(resid.T))
        self.noise_root = evecs * np.sqrt(np.clip(evals, 0, None))  # noise = z @ root.T, z ~ N(0, I)

    def draws(self, x: np.ndarray, count: int = 3) -> list[np.ndarray]:
        mapped = self.ridge.apply(x)
        return [mapped + np.random.default_rng(k).standard_normal(mapped.shape) @ self.noise_root.T
                for k in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--fit-rows", type=int, default=1500)
    ap.add_argument("--sources", type=int, default=15)
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--truth", type=Path, default=common.REPO / "tools" / "results" / "transfer_probe_t1000.jsonl")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--embed-only", action="store_true",
                    help="only cache the sources' fine-tuned embeddings of their fit texts (a second worker)")
    ap.add_argument("--reverse", action="store_true", help="take the sources last first")
    ap.add_argument("--kinds", default="ridge,mlp,noise", help="maps to score: ridge, mlp (slow to fit), noise")
    args = ap.parse_args()
    import torch
    from transformers import AutoModel

    from esm_index.index import SourceIndex

    if args.threads:
        torch.set_num_threads(args.threads)
    index = SourceIndex(common.REPO / "indexes" / "default", readonly=True)
    embedder = index.embedder
    sources = sorted({s for t in TARGETS for s in candidates(t, args.sources)})
    tuned_of = {}

    def tuned(s: str):
        if s not in tuned_of:
            tuned_of.clear()  # one encoder in memory at a time
            tuned_of[s] = embedder.with_model(AutoModel.from_pretrained(common.CACHE / "models" / s))
        return tuned_of[s]

    def key(texts: list[str]) -> str:
        return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]

    kinds = args.kinds.split(",")
    ridges, maps, noisy = {}, {}, {}
    for s in sources[::-1] if args.reverse else sources:
        t0 = time.perf_counter()
        texts = fit_texts(s, args.fit_rows)
        base = common.base_embeddings(embedder, texts)
        real = cached(OUT / "fit" / f"{s}_{key(texts)}.npy", lambda: tuned(s).embed(texts))
        if args.embed_only:
            continue
        ridges[s] = fit_ridge(base, real)  # the map the build fits; the other kinds start from it
        if "noise" in kinds:
            noisy[s] = NoisyRidge(ridges[s], base, real)
        if "mlp" not in kinds:
            continue
        maps[s] = ResidualMLP(ridges[s], base, real, args.hidden)
        r = ridges[s].meta["fit"]
        print(f"{s}: {len(texts)} pairs, identity mse {r['identity_mse']:.4f}, ridge {r['heldout_mse']:.4f}, "
              f"MLP removes {maps[s].resid_gain:.1%} of the ridge's residual on its held-out pairs, "
              f"{len(maps[s].val_curve)} epochs, {time.perf_counter() - t0:.0f} s", flush=True)

    if args.embed_only:
        return
    acc = accuracies(args.truth, "probe", "probe_acc")
    study = argparse.Namespace(index=common.REPO / "indexes" / "default", train=args.train, weights=[])
    rows = []
    for target in TARGETS:
        cands = [s for s in candidates(target, args.sources) if (target, s) in acc]
        if len(cands) < 5:
            continue
        # the real fine-tuned scores, from the transfer report's cache (it embeds the target
        # with every encoder when the cache lacks them): as ranks, which is all Spearman,
        # top-1 and regret need
        orders, _ = cached_rankings(target, cands, study)
        real = {"LogME": orders["LogME (fine-tuned)"], "ridge LOO": orders["ridge LOO accuracy (fine-tuned)"]}
        train, _ = target_split(target, load_target(target), args.train)
        x = index.embed(train.texts)
        mapped = {"ridge": {s: ridges[s].apply(x) for s in cands} if "ridge" in kinds else None,
                  "mlp": {s: maps[s].apply(x) for s in cands} if "mlp" in kinds else None,
                  "noise": {s: noisy[s].draws(x) for s in cands} if "noise" in kinds else None}
        mapped = {k: v for k, v in mapped.items() if v is not None}
        perf = {s: acc[(target, s)][0] for s in cands}
        row = {"target": target, "n": len(cands)}
        for score, fn in (("LogME", lambda f: logme(f, train.labels)),
                          ("ridge LOO", lambda f: ridge_loo_accuracy(f, train.labels))):
            row[f"{score} real regret@3"] = regret(perf, real[score], 3)
            rank = {s: -i for i, s in enumerate(real[score])}
            for kind, feats in mapped.items():
                val = {s: float(np.mean([fn(f) for f in feats[s]])) if isinstance(feats[s], list) else fn(feats[s])
                       for s in cands}
                order = sorted(cands, key=lambda s: val[s], reverse=True)
                row[f"{score} {kind} regret@3"] = regret(perf, order, 3)
                row[f"{score} {kind} fidelity"] = common.spearman(np.array([rank[s] for s in order]),
                                                                  -np.arange(len(order), dtype=float))
                row[f"{score} {kind} top-1 agrees"] = float(order[0] == real[score][0])
        row["random regret@3"] = random_regret(perf, 3)
        rows.append(row)
        print(target, {k: round(v, 2) for k, v in row.items() if "regret@3" in k or "fidelity" in k}, flush=True)

    print(f"\nmeans over {len(rows)} targets (truth: probe accuracy on up to 1,000 test rows)")
    for col in rows[0]:
        if col not in ("target", "n"):
            print(f"  {col:40s} {np.mean([r[col] for r in rows]):7.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
