"""Source summaries and the cheap scores computed from them.

Why this summary. ESM-LogME depends on a source only through its metric M = W~^T W~
(W~ = [W, b]): F F^T = X~ M X~^T. We fix a probe U ((d+1) x k, orthonormal) and summarise
each source by M projected on it:

    S = U^T M U = (W~ U)^T (W~ U)         (k x k, stored as its k(k+1)/2 upper triangle)

It is target-independent, computable from the ESM alone, and small (k=128: 8,256 floats,
against 148k for the ESM). A direction matters to the ranking when targets have variance
along it and sources differ along it, so U joins two halves: the top principal directions
of reference texts' embeddings (where targets live) and, once the pool has sources, the top
directions of between-source variation of M (where sources differ). ``summarize`` scales
off-diagonal entries by sqrt(2), so vector dot products equal Frobenius products.

The scores, from coarse to fine (prefilter.py chains them):

* ``approximate_scores``: the target's own top-k principal directions *inside* span(U), C;
  then C^T S C is the source's metric on them and the score is the exact LogME of the target
  projected there. Adapting the directions to the target is what makes this accurate, far
  more than scoring every target on one fixed probe (BENCHMARKS.md section 6 has the ranks
  it gives the exact top-5).
* ``centroid_scores``: the same score and its gradient at a few points of summary space (the
  FAISS cell centres), for the FAISS stage's local linearisation.
* ``refining_scores``: the same on the target's own top-k directions in the full space,
  from full maps - the closest of them, for the last hundred or so candidates.

A large target (more examples than the maps have outputs) is seen differently: every one of
its directions enters its score, and the score on its top-k principal directions alone can
order sources the other way (BENCHMARKS.md section 6). The three scores then take a source's
metric on the k directions where the pool's mean map weighs the target most and the pool's
mean elsewhere (``Pooled``, ``TargetView.pooled``).

All of them are exact in the limit: with every direction kept they equal ESM-LogME (tested).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .errors import InvalidArgumentError
from .logme import TargetStats, score_grams

DEFAULT_PROBE_DIM = 128  # k: the summary holds k(k+1)/2 floats
ADAPTED_DIM = 32  # target directions the approximate and refining stages use


def make_probe(reference_embeddings: np.ndarray, k: int) -> np.ndarray:
    """Top-k right singular vectors of [X_ref, 1]: the directions target data lives in."""
    x = np.asarray(reference_embeddings, np.float64)
    x = np.hstack([x, np.ones((len(x), 1))])
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    if k > vt.shape[0]:
        raise InvalidArgumentError(f"probe dimension {k} needs at least {k} reference texts and d >= {k - 1}")
    return vt[:k].T.astype(np.float32)  # ((d+1), k)


def pool_directions(weights: np.ndarray, biases: np.ndarray, k: int) -> np.ndarray:
    """Top-k eigenvectors of mean_s (M_s - M_mean)^2: where the sources' metrics differ."""
    w_aug = np.concatenate([weights, biases[:, :, None]], 2).astype(np.float64)
    metrics = np.einsum("bij,bik->bjk", w_aug, w_aug)
    dev = metrics - metrics.mean(0)
    _, vecs = np.linalg.eigh(np.einsum("bij,bjk->ik", dev, dev))
    return vecs[:, ::-1][:, :k]


def join_probe(reference: np.ndarray, pool: np.ndarray | None, k: int) -> np.ndarray:
    """k orthonormal probe directions: half reference, half pool (all reference if no pool)."""
    if pool is None:
        return reference[:, :k].astype(np.float32)
    q, _ = np.linalg.qr(np.hstack([reference[:, :k - k // 2], pool[:, :k // 2]]).astype(np.float64))
    return q.astype(np.float32)


# ---- summary vectors <-> matrices ------------------------------------------------------
def _vec_scale(k: int) -> torch.Tensor:
    i, j = torch.triu_indices(k, k)
    return torch.where(i == j, 1.0, math.sqrt(2.0))


def summarize(weights: np.ndarray | torch.Tensor, biases: np.ndarray | torch.Tensor,
              probe: np.ndarray) -> np.ndarray:
    """Summary vectors (B, k(k+1)/2) float32 of ESMs (B, D, d) / (B, D)."""
    w = torch.as_tensor(np.asarray(weights, np.float32) if not isinstance(weights, torch.Tensor) else weights)
    b = torch.as_tensor(np.asarray(biases, np.float32) if not isinstance(biases, torch.Tensor) else biases)
    u = torch.as_tensor(probe, dtype=torch.float32)
    w_aug = torch.cat([w, b.unsqueeze(-1)], 2).to(torch.float32)
    wu = (w_aug @ u).to(torch.float64)  # (B, D, k)
    gram = wu.transpose(1, 2) @ wu
    i, j = torch.triu_indices(u.shape[1], u.shape[1])
    return (gram[:, i, j] * _vec_scale(u.shape[1]).double()).float().numpy()


def summary_dim(k: int) -> int:
    return k * (k + 1) // 2


def probe_dim(width: int) -> int:
    """k from the summary vector length k(k+1)/2."""
    return int(round((math.isqrt(8 * width + 1) - 1) / 2))


def unvec(vectors: np.ndarray | torch.Tensor, k: int) -> torch.Tensor:
    """(B, k(k+1)/2) summary vectors back to symmetric (B, k, k) float32 matrices."""
    i, j = torch.triu_indices(k, k)
    position = torch.zeros(k, k, dtype=torch.long)
    position[i, j] = torch.arange(len(i))
    position[j, i] = torch.arange(len(i))
    if isinstance(vectors, torch.Tensor):  # keeps autograd
        return (vectors.float() / _vec_scale(k))[:, position.reshape(-1)].reshape(-1, k, k)
    full = np.take(np.asarray(vectors, np.float32), position.reshape(-1).numpy(), axis=1)
    return torch.from_numpy(full.reshape(-1, k, k)) / _vec_scale(k)[position]


# ---- scores ----------------------------------------------------------------------------
class Pooled(NamedTuple):
    """A large target (more examples than the maps have outputs) as the cheap stages see it:
    in the basis [V, T] of R's rows, V the top-k eigenvectors of the pool's mean kernel
    R M_mean R^T. A source's kernel is taken as its own block on V and the pool mean's on T:

        A_s ~ [[V^T R M_s R^T V, 0], [0, diag(tail)]],   V^T R M_s R^T V = lift^T M_s lift

    Why: every direction of such a target enters its score. Keeping the target's top-k
    principal directions only (the small-target approximation) drops the rest, and that
    score was anti-correlated with the exact one (BENCHMARKS.md section 6); filling the rest
    in with the pool's mean keeps the score's overall scale and leaves to the sources only
    the k directions in which the pool's maps weigh the target most."""

    target: TargetStats  # r = [V, T]^T R and qty = [V, T]^T Q^T y: the same target, rotated
    lift: torch.Tensor  # ((d+1), k) R^T V
    tail: torch.Tensor  # (rq - k,) the eigenvalues of R M_mean R^T outside V


class TargetView:
    """What the cheap stages need from a target, from the QR of [X, 1] = Q R computed once
    per query: every projection below works on R (at most (d+1) x (d+1)), never on X again.

    [X, 1] P = Q (R P) and the ones column is Q R[:, -1], so the projected target [X P, 1]
    has the QR of the small matrix [R P, R[:, -1]]; its principal directions are those of R.

    ``pool``: the prefilter's probe U and mean summary S_mean, so that a large target is
    seen through the pool's mean metric M_mean ~ U S_mean U^T (``pooled``)."""

    def __init__(self, stats: TargetStats, pool: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.r = stats.r.detach().cpu().to(torch.float64)
        self.qty, self.yy, self.n = stats.qty.detach().cpu(), stats.yy.detach().cpu(), stats.n
        self.weight = None if stats.weight is None else stats.weight.detach().cpu()
        self.kernel_side = stats.kernel_side
        self.pool = pool
        self._v = None
        self._pool_basis: tuple[TargetStats, torch.Tensor, torch.Tensor] | None = None

    def pooled(self, k: int, out_dim: int) -> Pooled | None:
        """The target as ``Pooled`` describes, or None for a small target (on the kernel side:
        the principal directions serve it, BENCHMARKS.md section 6) or without the pool's mean."""
        if self.pool is None or self.kernel_side(out_dim):
            return None
        if self._pool_basis is None:  # once per query: one eigendecomposition of (d+1)^2, any k
            probe, mean = self.pool
            ru = self.r @ torch.from_numpy(np.asarray(probe, np.float64))
            kernel = ru @ unvec(np.asarray(mean, np.float32)[None], probe.shape[1])[0].double() @ ru.T
            values, vectors = torch.linalg.eigh(kernel)
            basis = vectors.flip(1)  # largest first
            target = TargetStats(r=basis.T @ self.r, qty=basis.T @ self.qty, yy=self.yy, n=self.n,
                                 dim=self.r.shape[1] - 1, weight=self.weight)
            self._pool_basis = target, basis, values.flip(0)
        target, basis, values = self._pool_basis
        return Pooled(target, self.r.T @ basis[:, :k], values[k:].clone())

    @classmethod
    def from_embeddings(cls, x: np.ndarray, labels: np.ndarray, regression: bool = False) -> "TargetView":
        return cls(TargetStats.from_embeddings(x, labels, regression))

    def directions(self, k: int = ADAPTED_DIM, basis: np.ndarray | None = None) -> np.ndarray:
        """Top-k principal directions of [X, 1] ((d+1), k), or of [X, 1] U as coordinates C
        in span(U) (k_U, k), so that U C are the directions."""
        if basis is None:
            if self._v is None or self._v.shape[1] < min(k, *self.r.shape):  # once per query and k
                self._v = _right_singular_vectors(self.r.numpy(), k)
            return self._v[:, :k]
        return _right_singular_vectors(self.r.numpy() @ np.asarray(basis, np.float64), k)

    def project(self, directions: np.ndarray) -> TargetStats:
        """The target's statistics in span(P) for orthonormal P ((d+1), k)."""
        p = torch.as_tensor(np.asarray(directions, np.float64))
        q2, r2 = torch.linalg.qr(torch.cat([self.r @ p, self.r[:, -1:]], 1), mode="reduced")
        k = p.shape[1]
        return TargetStats(r=r2[:, :k], qty=q2.T @ self.qty, yy=self.yy, n=self.n, dim=k, weight=self.weight)


def _right_singular_vectors(r: np.ndarray, k: int) -> np.ndarray:
    """Top-k right singular vectors of r, from the eigendecomposition of the smaller Gram
    matrix (faster than an SVD; only well-separated top directions are used, so the squared
    condition number does no harm)."""
    k = min(k, *r.shape)
    if r.shape[0] < r.shape[1]:
        s2, u = _top_eigh(r @ r.T, k)
        s = np.sqrt(np.maximum(s2, 1e-300))
        q, rr = np.linalg.qr(r.T @ u / s)  # re-orthonormalise: rounding in tiny singular values
        return q * np.sign(np.diag(rr))
    return np.ascontiguousarray(_top_eigh(r.T @ r, k)[1])


def _top_eigh(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues of a symmetric matrix and their vectors, largest first. A
    few of many (the usual 32 of ~300) come cheaper from LAPACK's subset driver: 6.5 ms
    against 12.7 ms for all of them at 300, one thread."""
    m = gram.shape[0]
    if 4 * k <= m:
        from scipy.linalg import eigh

        values, vectors = eigh(gram, subset_by_index=[m - k, m - 1], driver="evr")
    else:
        values, vectors = np.linalg.eigh(gram)
    return values[::-1][:k], vectors[:, ::-1][:, :k]


class StageScorer(NamedTuple):
    """How a cheap stage scores sources from their metrics on a few directions P ((d+1), a),
    P^T M P (B, a, a): the target's small Gram matrices from them, then LogME (score_grams).

    Small target: P orthonormal, the target projected on span(P), Gram = R_P (P^T M P) R_P^T.
    Large target (``Pooled``): P = R^T V, Gram = [[P^T M P, 0], [0, diag(tail)]]."""

    target: TargetStats
    directions: torch.Tensor  # ((d+1), a) float64
    tail: torch.Tensor | None  # Pooled's fixed eigenvalues; None for a projected target

    def scores(self, metrics: torch.Tensor, out_dim: int, differentiable: bool = False) -> torch.Tensor:
        gram = metrics if self.tail is not None else self.target.r @ metrics @ self.target.r.T
        return score_grams(self.target, gram, out_dim, differentiable, tail=self.tail)

    def batched(self, metrics: torch.Tensor, out_dim: int, batch_size: int = 2048) -> np.ndarray:
        out = [self.scores(metrics[i:i + batch_size].to(torch.float64), out_dim)
               for i in range(0, metrics.shape[0], batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0)


def stage_scorer(view: TargetView, k: int, out_dim: int, probe: np.ndarray | None = None) -> StageScorer:
    """The directions a stage scores a target on: for a large target its ``Pooled`` view;
    otherwise its own top-k principal directions, within span(``probe``) when given."""
    pooled = view.pooled(k, out_dim)
    if pooled is not None:
        return StageScorer(pooled.target, pooled.lift, pooled.tail)
    if probe is None:
        directions = view.directions(k)
    else:
        directions = probe.astype(np.float64) @ view.directions(k, probe)
    return StageScorer(view.project(directions), torch.from_numpy(np.asarray(directions, np.float64)), None)


def approximate_scores(view: TargetView, probe: np.ndarray, summaries: np.ndarray, out_dim: int,
                       k: int = ADAPTED_DIM) -> np.ndarray:
    """The approximate stage, from summaries alone: a source's metric on the stage's
    directions P is C^T S C with C = U^T P (P lies in span(U) for a small target; for a
    large one this keeps the part of P inside span(U))."""
    scorer = stage_scorer(view, k, out_dim, probe)
    c = torch.from_numpy(probe.astype(np.float64)).T @ scorer.directions  # (k_U, a)
    return scorer.batched(c.T @ unvec(summaries, probe.shape[1]).double() @ c, out_dim)


def refining_scores(view: TargetView, weights: np.ndarray, biases: np.ndarray, k: int = ADAPTED_DIM) -> np.ndarray:
    """The refining stage, from full ESMs: a source's metric on the stage's directions P is
    ([W, b] P)^T ([W, b] P). Closest to the exact score, but it needs each source's whole map."""
    scorer = stage_scorer(view, k, weights.shape[1])
    p = scorer.directions.float()
    wp = torch.as_tensor(weights) @ p[:-1] + torch.as_tensor(biases).unsqueeze(-1) * p[-1]  # [W, b] P, no copy of W
    wp = wp.double()
    return scorer.batched(wp.transpose(1, 2) @ wp, weights.shape[1])


def centroid_scores(view: TargetView, probe: np.ndarray, mean: np.ndarray, basis: np.ndarray,
                    centroids: np.ndarray, out_dim: int, k: int = ADAPTED_DIM):
    """The approximate score f at summaries S = mean + sum_j c_j basis_j, one per row c of
    ``centroids`` (K, m), and its gradient in c: (f (K,), g (K, m))."""
    scorer = stage_scorer(view, k, out_dim, probe)
    c = torch.from_numpy(probe.astype(np.float64)).T @ scorer.directions
    mats = c.T @ unvec(np.vstack([mean[None], basis]), probe.shape[1]).double() @ c  # (1+m, a, a)
    z = torch.from_numpy(np.asarray(centroids, np.float64)).requires_grad_(True)
    f = scorer.scores(mats[0] + torch.einsum("kj,jab->kab", z, mats[1:]), out_dim, differentiable=True)
    (g,) = torch.autograd.grad(f.sum(), z)
    return f.detach().numpy(), g.numpy()
