"""ESM-LogME: the LogME evidence of a target's labels on ESM-mapped embeddings, batched.

LogME (You et al., 2021) scores features F (n x D) for labels y by the evidence of a Bayesian
linear regression y = F m + noise, m ~ N(0, 1/alpha), noise ~ N(0, 1/beta), maximised over
alpha and beta by a fixed-point iteration. With F = U diag(s) V^T (k kept singular values,
sigma = s^2) and x = U^T y, each step is

    t      = alpha / beta
    gamma  = sum_i sigma_i / (sigma_i + t)
    m2     = sum_i sigma_i x_i^2 / (t + sigma_i)^2          (= |m|^2)
    res2   = sum_i x_i^2 / (1 + sigma_i / t)^2 + (|y|^2 - |x|^2)   (= |y - F m|^2)
    alpha  = gamma / (m2 + 1e-5),   beta = (n - gamma) / (res2 + 1e-5)

until |t_new - t| / t <= 1e-3 (at most 50 steps), and the score is the evidence per example

    L = D/2 log alpha + n/2 log beta - 1/2 sum_i log(alpha + beta sigma_i)
        - beta/2 res2 - alpha/2 m2 - n/2 log(2 pi),          score = L / n,

averaged over label columns (one-hot classes 0..max(label), or regression targets; absent
classes share one weighted zero column, see ``label_matrix``). All of
this follows ``hfselect.logme`` (the paper authors' package) step for step, so the scores
agree with theirs to ~1e-8.

Why it is fast: with an ESM (W, b), F = X~ W~^T where X~ = [X, 1] (target embeddings plus a
ones column) and W~ = [W, b]. Take the thin QR X~ = Q R once per target (r = min(n, d+1)
columns). Then F = Q (R W~^T) = Q K, so F has the singular values of K (r x D) and
U^T y = P^T (Q^T y) with P the left singular vectors of K. Per source we only need the
spectrum of a (min(r, D))^2 Gram matrix of K; n never appears again, and no mapped embedding
set is ever materialised. The QR also picks the cheaper side of n vs d for us.

Two ways to get that spectrum: ``EigTerms`` (batched eigh; the GPU path, maps to <= 64
dimensions, and differentiable scores) and ``TridiagonalTerms`` (a tridiagonalisation, its
eigenvalues and shifted tridiagonal solves, no eigenvectors; the CPU path, on either side
of n vs D). ``fixed_point`` runs the iteration on either.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .checks import label_matrix
from .errors import InvalidESMError, InvalidTargetError, ModelMismatchError

MAX_STEPS = 50  # hfselect's limit on fixed-point steps
RTOL = 1e-3  # hfselect's convergence test on t = alpha / beta
EPS = 1e-5  # hfselect's regulariser in the alpha and beta updates
RANK_TOL = 1e-10  # hfselect drops singular values at or below this (when n > D)


@dataclass
class TargetStats:
    """Everything the scorer needs from a target, computed once: R and Q^T Y of the QR of
    [X, 1], |y|^2 per label column, and n. Its size is O(d^2), whatever n is."""

    r: torch.Tensor  # (rq, d+1)  R factor of [X, 1]
    qty: torch.Tensor  # (rq, C)  Q^T Y
    yy: torch.Tensor  # (C,)     |y_c|^2
    n: int
    dim: int  # d, the input dimension an ESM must accept
    weight: torch.Tensor | None = None  # (C,) column weights of the mean (absent classes), None: equal

    @classmethod
    def from_embeddings(
        cls, x: np.ndarray | torch.Tensor, labels: np.ndarray, regression: bool = False,
        device: str | torch.device = "cpu",
    ) -> "TargetStats":
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if x.ndim != 2 or x.shape[0] == 0:
            raise InvalidTargetError(f"target embeddings must be (n, d) with n > 0, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InvalidTargetError("target embeddings contain NaN or infinity")
        y, weight = label_matrix(labels, regression)
        if y.shape[0] != x.shape[0]:
            raise InvalidTargetError(f"{x.shape[0]} embeddings but {y.shape[0]} labels")
        xt = torch.cat([x.to(torch.float64), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        q, r = torch.linalg.qr(xt.to(device), mode="reduced")
        yt = torch.as_tensor(y, device=device)
        return cls(r=r, qty=q.T @ yt, yy=(yt * yt).sum(0), n=x.shape[0], dim=x.shape[1],
                   weight=None if weight is None else torch.as_tensor(weight))


def check_esm_batch(weights: torch.Tensor, biases: torch.Tensor, dim: int) -> None:
    """Refuse maps that would give a wrong answer instead of a score."""
    if weights.ndim != 3 or biases.ndim != 2 or weights.shape[:2] != biases.shape:
        raise InvalidESMError(f"ESM weights must be (B, D, d) and biases (B, D); got "
                              f"{tuple(weights.shape)} and {tuple(biases.shape)}")
    if weights.shape[2] != dim:
        raise ModelMismatchError(f"ESM input dimension {weights.shape[2]} does not match "
                                 f"the target embedding dimension {dim}")
    if not (torch.isfinite(weights.sum(dtype=torch.float64)) and torch.isfinite(biases.sum(dtype=torch.float64))):
        raise InvalidESMError("ESM weights contain NaN or infinity")


def _gram(target: TargetStats, weights: torch.Tensor, biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The Gram matrix whose spectrum decides the score, and the matching right-hand side.

    K = R [W, b]^T (rq x D). Kernel side (rq <= D, small targets): A = K K^T and z = Q^T y.
    Feature side (n > D): A = K^T K and z = K^T Q^T y (= F^T y); there x_i = v_i^T z / s_i.
    Float64 throughout: a float32 Gram moved scores by 5e-6 at n = 5,000 (measured).
    """
    w, b = weights.to(target.r), biases.to(target.r)
    k = target.r[:, :-1] @ w.transpose(1, 2) + target.r[:, -1:] * b.unsqueeze(1)  # R [W, b]^T: (B, rq, D)
    if k.shape[1] <= k.shape[2]:
        return k @ k.transpose(1, 2), target.qty.expand(k.shape[0], -1, -1), True
    kt = k.transpose(1, 2)
    return kt @ k, kt @ target.qty, False


class EigTerms:
    """Fixed-point terms from a full eigendecomposition (GPU, and small problems).

    With x = U^T y: m2 = sum sigma x^2/(t+sigma)^2, res2 = sum x^2 t^2/(t+sigma)^2 + |y|^2 - |x|^2.
    """

    def __init__(self, gram: torch.Tensor, rhs: torch.Tensor, kernel_side: bool, yy: torch.Tensor,
                 drop_null: int = 0) -> None:
        if gram.device.type == "cpu" and not gram.requires_grad:  # numpy's batched eigh: 3x torch's on small CPU matrices
            sigma, vecs = (torch.from_numpy(a) for a in np.linalg.eigh(gram.numpy()))
        else:
            sigma, vecs = torch.linalg.eigh(gram)
        sigma = sigma.abs()  # hfselect takes an SVD of the Gram: rounding noise counts as |lambda|
        proj = vecs.transpose(1, 2) @ rhs
        if kernel_side and drop_null:  # a small kernel standing in for the feature side (n > D):
            # its ``drop_null`` smallest eigenvalues are structural zeros, not in that spectrum
            self.keep = torch.arange(sigma.shape[1], device=sigma.device) >= drop_null
            self.keep = self.keep.expand_as(sigma)
            proj = torch.where(self.keep.unsqueeze(-1), proj, 0.0)
        elif kernel_side:  # hfselect keeps every one of the n eigenvalues here
            self.keep = torch.ones_like(sigma, dtype=torch.bool)
        else:  # hfselect drops singular values <= RANK_TOL when n > D
            s = sigma.sqrt()
            self.keep = s > RANK_TOL
            proj = torch.where(self.keep.unsqueeze(-1), proj / torch.where(self.keep, s, 1.0).unsqueeze(-1), 0.0)
        self.sigma = torch.where(self.keep, sigma, 0.0)
        self.x2 = proj * proj
        self.res_x2 = yy.unsqueeze(0) - self.x2.sum(1)

    def __call__(self, t: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sig, t = self.sigma.unsqueeze(-1), t.unsqueeze(1)
        m2 = (sig * self.x2 / (t + sig) ** 2).sum(1)
        res2 = (self.x2 / (1 + sig / t) ** 2).sum(1) + self.res_x2
        return m2, res2


class TridiagonalTerms:
    """The same terms without eigenvectors, for the CPU.

    An eigendecomposition with vectors costs ~3x a tridiagonalisation A = H T H^T. The fixed
    point needs the eigenvalues (for gamma and log det: dsterf, O(D^2)) and two quadratic
    forms in the resolvent, which one shifted tridiagonal solve w = (T + tI)^-1 H^T z gives
    per (source, label column) in O(D):

        feature side: m2 = |w|^2,              res2 = |y|^2 - z.w - t |w|^2
        kernel side:  m2 = z.w - t |w|^2,      res2 = t^2 |w|^2 + |y|^2 - |z|^2

    Build it with ``feature_side`` (n > D: Gram, reduction and all, compiled and run in
    parallel over sources) or ``kernel_side`` (small targets: a small Gram per source).
    """

    def __init__(self, diag: np.ndarray, off: np.ndarray, z: np.ndarray, sigma: np.ndarray,
                 kernel_side: bool, yy: torch.Tensor) -> None:
        self.diag, self.off, self.z = diag, off, z  # (B, m), (B, m-1), (B, C, m)
        sigma = torch.from_numpy(sigma).abs()  # as in EigTerms
        self.keep = torch.ones_like(sigma, dtype=torch.bool) if kernel_side else sigma.sqrt() > RANK_TOL
        self.sigma = torch.where(self.keep, sigma, 0.0)
        self.kernel_side = kernel_side
        self.yy = yy.cpu().numpy()[None, :]
        self.zz = (self.z * self.z).sum(2)

    @classmethod
    def feature_side(cls, target: TargetStats, chunks) -> "TridiagonalTerms":
        """K = R [W,b]^T, A = K^T K, its reduction and H^T K^T Q^T y, per source in float64."""
        from scipy.linalg import lapack
        from threadpoolctl import threadpool_limits

        from ._kernels import reduce_feature_side

        r = np.ascontiguousarray(target.r.cpu().numpy())
        rt_qty = target.r.T @ target.qty  # K^T Q^T y = [W,b] (R^T Q^T y)
        parts = []
        for w, b in chunks:
            w_aug = torch.cat([w, b.unsqueeze(-1)], dim=2).to(torch.float64)
            z = (w_aug @ rt_qty).transpose(1, 2).contiguous().numpy()
            lwork = int(lapack.dsytrd_lwork(w_aug.shape[1], lower=1)[0])
            with threadpool_limits(1):  # one BLAS thread per source, sources in parallel
                diag, off, sigma = reduce_feature_side(r, w_aug.numpy(), z, lwork)
            parts.append((diag, off, z, sigma))
        diag, off, z, sigma = (np.concatenate(p) for p in zip(*parts))
        return cls(diag, off, z, sigma, False, target.yy)

    @classmethod
    def from_grams(cls, gram: torch.Tensor, rhs: torch.Tensor, yy: torch.Tensor) -> "TridiagonalTerms":
        """Kernel-side terms of given Gram matrices (B, m, m) and right-hand sides (B, m, C),
        reduced in parallel by a compiled loop over LAPACK (dsytrd, dormqr, dsterf)."""
        from scipy.linalg import lapack
        from threadpoolctl import threadpool_limits

        from ._kernels import reduce_symmetric

        z = np.ascontiguousarray(rhs.transpose(1, 2).numpy(), dtype=np.float64)
        lwork = int(lapack.dsytrd_lwork(gram.shape[1], lower=1)[0])
        with threadpool_limits(1):
            diag, off, sigma = reduce_symmetric(np.ascontiguousarray(gram.numpy(), dtype=np.float64), z, lwork)
        return cls(diag, off, z, sigma, True, yy)  # m > 1: off is (B, m - 1)

    @classmethod
    def kernel_side(cls, target: TargetStats, chunks) -> "TridiagonalTerms":
        """A = K K^T (n x n, n small) per source, reduced by ``from_grams``."""
        parts = [cls.from_grams(*_gram(target, w, b)[:2], target.yy) for w, b in chunks]
        joined = [np.concatenate([getattr(p, name) for p in parts]) for name in ("diag", "off", "z")]
        return cls(*joined, np.concatenate([p.sigma.numpy() for p in parts]), True, target.yy)

    def __call__(self, t: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from ._kernels import resolvent_sums

        tn = t.numpy()
        mask = np.ones(tn.shape, dtype=np.bool_) if active is None else active.numpy()
        zw, ww = resolvent_sums(self.diag, self.off, self.z, tn, mask)
        if self.kernel_side:
            m2, res2 = zw - tn * ww, tn * tn * ww + self.yy - self.zz
        else:
            m2, res2 = ww, self.yy - zw - tn * ww
        return torch.from_numpy(m2), torch.from_numpy(res2)


def fixed_point(terms, sigma: torch.Tensor, keep: torch.Tensor, n: int, out_dim: int, columns: int,
                extra_zeros: int = 0, params: bool = False, weight: torch.Tensor | None = None):
    """hfselect's fixed point for every (source, label column) at once; returns the mean
    evidence per example of each source, shape (B,) (and alpha, beta (B, C) with ``params``).
    ``terms(t, active)`` gives (m2, res2) (it may skip pairs that are no longer active: their
    values are not used). ``extra_zeros`` kept zero eigenvalues are not in ``sigma``: each
    adds log(alpha) to log det. ``weight`` (C,): the columns' weights in the mean (None: equal)."""
    sig = sigma.unsqueeze(-1)  # (B, k, 1)
    kept = keep.unsqueeze(-1).to(sigma.dtype)
    if isinstance(terms, EigTerms) and sigma.device.type == "cpu":  # compiled, each pair stops on its own
        from ._kernels import dense_fixed_point

        arrays = (sigma.detach().numpy(), keep.numpy(), terms.x2.detach().numpy(), terms.res_x2.detach().numpy())
        alpha, beta, m2, res2 = map(torch.from_numpy, dense_fixed_point(*arrays, n, MAX_STEPS, RTOL, EPS))
        score = _evidence(alpha, beta, sig, kept, m2, res2, n, out_dim, extra_zeros, weight)
        return (score, alpha, beta) if params else score
    shape = (sigma.shape[0], columns)
    alpha = torch.ones(shape, dtype=sigma.dtype, device=sigma.device)
    beta = torch.ones_like(alpha)
    m2 = torch.zeros_like(alpha)
    res2 = torch.zeros_like(alpha)
    active = torch.ones(shape, dtype=torch.bool, device=sigma.device)
    for _ in range(MAX_STEPS):
        t = alpha / beta  # (B, C)
        gamma_i = (kept * sig / (sig + t.unsqueeze(1))).sum(1)
        m2_i, res2_i = terms(t, active)
        alpha_i = gamma_i / (m2_i + EPS)
        beta_i = (n - gamma_i) / (res2_i + EPS)
        done = (alpha_i / beta_i - t).abs() / t <= RTOL
        alpha = torch.where(active, alpha_i, alpha)
        beta = torch.where(active, beta_i, beta)
        m2 = torch.where(active, m2_i, m2)
        res2 = torch.where(active, res2_i, res2)
        active = active & ~done
        if not active.any():
            break
    score = _evidence(alpha, beta, sig, kept, m2, res2, n, out_dim, extra_zeros, weight)
    return (score, alpha, beta) if params else score


def _evidence(alpha, beta, sig, kept, m2, res2, n: int, out_dim: int, extra_zeros: int,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """L / n averaged over label columns (the formula in the module docstring), with
    ``weight`` when one column stands for several absent classes."""
    log_det = (kept * torch.log(alpha.unsqueeze(1) + beta.unsqueeze(1) * sig)).sum(1) + extra_zeros * torch.log(alpha)
    evidence = (out_dim / 2.0 * torch.log(alpha) + n / 2.0 * torch.log(beta) - 0.5 * log_det
                - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * math.log(2 * math.pi))
    if weight is None:
        return (evidence / n).mean(1)
    return (evidence / n * weight.to(evidence)).sum(1)


def score_esms(
    target: TargetStats, weights: torch.Tensor, biases: torch.Tensor, batch_size: int = 64, method: str = "auto"
) -> np.ndarray:
    """ESM-LogME of one target for a stack of ESMs (B, D, d) / (B, D); higher is better.

    Weights may be float16/float32 on any device; the algebra runs in float64 on the
    target's device, ``batch_size`` sources at a time to bound memory (B x D x D doubles).
    ``method``: "eigh" (batched eigendecomposition, best on a GPU), "tridiagonal" (no
    eigenvectors, best on a CPU) or "auto".
    """
    check_esm_batch(weights, biases, target.dim)
    if weights.shape[0] == 0:
        return np.zeros(0)
    device = target.r.device
    kernel_side = target.r.shape[0] <= weights.shape[1]
    if method == "auto":
        method = "eigh" if device.type == "cuda" or weights.shape[1] <= 64 else "tridiagonal"
    chunks = [(weights[i:i + batch_size].to(device), biases[i:i + batch_size].to(device))
              for i in range(0, weights.shape[0], batch_size)]
    out_dim, cols = weights.shape[1], target.qty.shape[1]
    if method == "tridiagonal" and not kernel_side and target.r.shape[0] != target.r.shape[1]:
        method = "eigh"  # n between D and d (maps to fewer dimensions): R is not square
    if method == "tridiagonal":
        build = TridiagonalTerms.kernel_side if kernel_side else TridiagonalTerms.feature_side
        terms = build(target, chunks)
        return fixed_point(terms, terms.sigma, terms.keep, target.n, out_dim, cols, weight=target.weight).numpy()
    out = []
    for w, b in chunks:
        terms = EigTerms(*_gram(target, w, b), target.yy)
        out.append(fixed_point(terms, terms.sigma, terms.keep, target.n, out_dim, cols, weight=target.weight).cpu())
    return torch.cat(out).numpy()


def score_grams(target: TargetStats, gram: torch.Tensor, out_dim: int, differentiable: bool = False) -> torch.Tensor:
    """Scores (B,) of a target whose QR factor R has few columns (a projected target), from
    the small kernels A = R S R^T (B, rq, rq). This is the exact LogME of the n x out_dim
    features such a target's F would be: as hfselect does, all n kernel eigenvalues count when
    n <= out_dim (the n - rq we do not form are zeros), and null directions are dropped when
    n > out_dim.

    ``differentiable``: gradients flow to ``gram``. They do not go through the iterations:
    the fixed point is where the evidence is stationary in alpha and beta, so (envelope
    theorem) the evidence at the converged alpha, beta, held fixed, has the same gradient -
    one backward pass through eigh instead of fifty through the loop."""
    kernel_side = target.n <= out_dim
    null = 0 if kernel_side else gram.shape[1] - min(target.r.shape[1], out_dim)  # rank <= both
    extra, cols = (target.n - gram.shape[1] if kernel_side else 0), target.qty.shape[1]
    if not differentiable and gram.device.type == "cpu" and gram.shape[1] > 1:
        terms = TridiagonalTerms.from_grams(gram, target.qty.expand(len(gram), -1, -1), target.yy)
        if null:  # eigenvalues come sorted: the smallest ``null`` are the structural zeros
            terms.keep = (torch.arange(gram.shape[1]) >= null).expand_as(terms.sigma)
            terms.sigma = torch.where(terms.keep, terms.sigma, 0.0)
        return fixed_point(terms, terms.sigma, terms.keep, target.n, out_dim, cols, extra, weight=target.weight)
    terms = EigTerms(gram, target.qty.expand(len(gram), -1, -1), True, target.yy, drop_null=null)
    if not differentiable:
        return fixed_point(terms, terms.sigma, terms.keep, target.n, out_dim, cols, extra, weight=target.weight)
    with torch.no_grad():
        _, alpha, beta = fixed_point(terms, terms.sigma, terms.keep, target.n, out_dim, cols, extra, params=True)
    m2, res2 = terms(alpha / beta)
    kept = terms.keep.unsqueeze(-1).to(terms.sigma.dtype)
    return _evidence(alpha, beta, terms.sigma.unsqueeze(-1), kept, m2, res2, target.n, out_dim, extra, target.weight)


def logme(features: np.ndarray, labels: np.ndarray, regression: bool = False) -> float:
    """Plain LogME of features (n, D) for labels: the identity map through the same code."""
    features = np.asarray(features, dtype=np.float64)
    target = TargetStats.from_embeddings(features, labels, regression)
    eye = torch.eye(features.shape[1], dtype=torch.float64).unsqueeze(0)
    return float(score_esms(target, eye, torch.zeros(1, features.shape[1], dtype=torch.float64))[0])


_BLAS_LOCK = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread while queries run. A query is many small dense problems; with
    OpenBLAS's threads next to torch's and numba's OpenMP threads, 2 cores were oversubscribed
    and the 10k p50 doubled (0.35 s against 0.175 s, measured). Counted, so overlapping
    queries from several threads restore the process's setting only when the last one ends.
    (OpenBLAS builds on OpenMP keep the setting per thread: there only the first of
    overlapping queries runs limited, which costs speed, never results.)"""
    global _blas_users, _blas_limiter
    import scipy.linalg  # noqa: F401 - load scipy's own OpenBLAS first: only loaded libraries are limited
    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _blas_users == 0:
            _blas_limiter = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
