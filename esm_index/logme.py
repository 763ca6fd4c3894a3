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
classes share one weighted zero column, see ``label_matrix``). This is ``hfselect.logme``'s
computation (the paper authors' package, after thuml/LogME) step for step.
``tests/reference_logme.py`` writes it out plainly, one label column at a time; the tests
hold this module to that reference and to hfselect.

Why it is fast: with an ESM (W, b), F = X~ W~^T where X~ = [X, 1] (target embeddings plus a
ones column) and W~ = [W, b]. Take the thin QR X~ = Q R once per target (r = min(n, d+1)
columns). Then F = Q (R W~^T) = Q K, so F has the singular values of K (r x D) and
U^T y = P^T (Q^T y) with P the left singular vectors of K. Per source we only need the
spectrum of a (min(r, D))^2 Gram matrix of K; n never appears again, and no mapped embedding
set is ever materialised. The QR also picks the cheaper side of n vs d for us.

The pieces, in the order a score is computed:

    TargetStats        the target, once: R, Q^T Y and |y|^2
    _gram              per source: the Gram matrix of K and the matching right-hand side
    EigTerms,          the spectrum (sigma, keep) and the sums m2, res2 at any t, from the
    TridiagonalTerms     Gram matrices: the two backends below
    fixed_point        the iteration above on every (source, label column) pair, then L / n
    score_esms,        the entry points: full maps, or small Gram matrices of projected
    score_grams          targets (summary.py)

Backends. ``choose_backend`` is the one place a backend is picked:

    "eigh"         a batched eigendecomposition of each Gram, vectors included, so x = U^T y
                   is explicit and m2, res2 are dense sums. Runs anywhere and is
                   differentiable. Its fixed point is compiled on a CPU, each pair stopping
                   on its own (``_kernels.dense_fixed_point``), and a batched torch loop
                   elsewhere.
    "tridiagonal"  A = H T H^T, the eigenvalues of T, and per step one shifted tridiagonal
                   solve for m2 and res2 (no eigenvectors, see ``TridiagonalTerms``); CPU
                   only. Its fixed point is the batched torch loop, the solves compiled
                   (``_kernels.resolvent_sums``).

Both loops do the step above and nothing else; the tests check them against each other and
against the reference.
"""

from __future__ import annotations

import importlib
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .checks import label_matrix
from .errors import InvalidArgumentError, InvalidESMError, InvalidTargetError, ModelMismatchError

MAX_STEPS = 50  # hfselect's limit on fixed-point steps
RTOL = 1e-3  # hfselect's convergence test on t = alpha / beta
EPS = 1e-5  # hfselect's regulariser in the alpha and beta updates
RANK_TOL = 1e-10  # hfselect drops singular values at or below this (when n > D)

EIGH, TRIDIAGONAL = "eigh", "tridiagonal"  # how the spectrum and the sums are computed
COMPILED, TORCH = "compiled", "torch"  # which loop runs the fixed point
EIGH_UP_TO = 64  # on a CPU, score_esms uses "eigh" for maps to at most this many dimensions


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
    if weights.numel() and not all(torch.isfinite(torch.stack(torch.aminmax(t))).all() for t in (weights, biases)):
        # aminmax propagates NaN and shows an infinity: one pass, no float64 copy
        raise InvalidESMError("ESM weights contain NaN or infinity")


def _gram(target: TargetStats, weights: torch.Tensor, biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The Gram matrix whose spectrum decides the score, and the matching right-hand side.

    K = R [W, b]^T (rq x D). Kernel side (rq <= D, small targets): A = K K^T and z = Q^T y.
    Feature side (n > D): A = K^T K and z = K^T Q^T y (= F^T y); there x_i = v_i^T z / s_i.
    Float64 throughout: a float32 Gram moves the scores visibly (BENCHMARKS.md section 1).
    """
    w, b = weights.to(target.r), biases.to(target.r)
    k = target.r[:, :-1] @ w.transpose(1, 2) + target.r[:, -1:] * b.unsqueeze(1)  # R [W, b]^T: (B, rq, D)
    if k.shape[1] <= k.shape[2]:
        return k @ k.transpose(1, 2), target.qty.expand(k.shape[0], -1, -1), True
    kt = k.transpose(1, 2)
    return kt @ k, kt @ target.qty, False


class Backend(NamedTuple):
    """How a batch is scored: ``spectrum`` (EIGH or TRIDIAGONAL: which terms class computes
    sigma, m2 and res2) and ``loop`` (COMPILED or TORCH: which loop runs the fixed point)."""

    spectrum: str
    loop: str


def choose_backend(device: torch.device, size: int, requested: str = "auto", *, eigh_up_to: int,
                   tridiagonal_ok: bool = True) -> Backend:
    """The backend for Gram matrices of ``size`` on ``device``: ``requested`` unless "auto";
    "auto" is "eigh" off the CPU or for sizes up to ``eigh_up_to``, "tridiagonal" otherwise.
    ``tridiagonal_ok`` False (a shape the tridiagonal reduction does not handle) means "eigh".
    The compiled loop needs eigenvectors and a CPU; everything else runs the torch loop."""
    if requested not in ("auto", EIGH, TRIDIAGONAL):
        raise InvalidArgumentError(f"unknown scoring method {requested!r}; use 'auto', 'eigh' or 'tridiagonal'")
    spectrum = requested
    if spectrum == "auto":
        spectrum = EIGH if device.type != "cpu" or size <= eigh_up_to else TRIDIAGONAL
    if not tridiagonal_ok:
        spectrum = EIGH
    return Backend(spectrum, COMPILED if spectrum == EIGH and device.type == "cpu" else TORCH)


def _kept(sigma: torch.Tensor, kernel_side: bool, drop_null: int) -> torch.Tensor:
    """Which of the eigenvalues sigma (B, m), ascending, enter the sums, as hfselect counts
    them. Kernel side (A = K K^T, n <= D): all n. Feature side (A = K^T K): those with a
    singular value above RANK_TOL. ``drop_null``: the smallest ``drop_null`` of a kernel are
    structural zeros of the feature side it stands in for (``score_grams``), left out."""
    if drop_null:
        return (torch.arange(sigma.shape[1], device=sigma.device) >= drop_null).expand_as(sigma)
    if kernel_side:
        return torch.ones_like(sigma, dtype=torch.bool)
    return sigma.sqrt() > RANK_TOL


def _dense_sums(sigma: torch.Tensor, x2: torch.Tensor, t: torch.Tensor,
                res_x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m2 and res2 of the module docstring, summed over dim 1 (the eigenvalues)."""
    m2 = (sigma * x2 / (t + sigma) ** 2).sum(1)
    res2 = (x2 / (1 + sigma / t) ** 2).sum(1) + res_x2
    return m2, res2


class EigTerms:
    """The "eigh" backend: A = V diag(sigma) V^T for each Gram matrix, then x = U^T y and the
    dense sums m2, res2 of the module docstring.

    gram (B, m, m) and rhs (B, m, C) from ``_gram``: on the kernel side x = V^T (Q^T y); on the
    feature side rhs is F^T y and x_i = v_i^T rhs / s_i. ``drop_null``: see ``_kept``.
    Attributes: sigma, keep (B, m) (dropped eigenvalues are 0 in sigma), x2 (B, m, C) the
    squared x (0 where dropped), res_x2 (B, C) = |y|^2 - |x|^2.
    """

    def __init__(self, gram: torch.Tensor, rhs: torch.Tensor, kernel_side: bool, yy: torch.Tensor,
                 drop_null: int = 0) -> None:
        if gram.device.type == "cpu" and not gram.requires_grad:  # numpy's batched eigh is faster on small CPU matrices
            sigma, vecs = (torch.from_numpy(a) for a in np.linalg.eigh(gram.numpy()))
        else:
            sigma, vecs = torch.linalg.eigh(gram)
        sigma = sigma.abs()  # hfselect takes an SVD of the Gram: rounding noise counts as |lambda|
        self.keep = _kept(sigma, kernel_side, drop_null)
        proj = vecs.transpose(1, 2) @ rhs  # (B, m, C)
        if not kernel_side:
            proj = proj / torch.where(self.keep, sigma.sqrt(), 1.0).unsqueeze(-1)
        if drop_null or not kernel_side:
            proj = torch.where(self.keep.unsqueeze(-1), proj, 0.0)
        self.sigma = torch.where(self.keep, sigma, 0.0)
        self.x2 = proj * proj
        self.res_x2 = yy.unsqueeze(0) - self.x2.sum(1)
        self.shape = (self.x2.shape[0], self.x2.shape[2])  # (sources, label columns)

    def sums(self, t: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """m2 and res2 (B, C) at t (B, C); with ``active`` (B, C), only for those pairs (the
        others are 0). Differentiable."""
        if active is None:
            return _dense_sums(self.sigma.unsqueeze(-1), self.x2, t.unsqueeze(1), self.res_x2)
        b, c = active.nonzero(as_tuple=True)
        m2, res2 = _dense_sums(self.sigma[b], self.x2[b, :, c], t[b, c].unsqueeze(1), self.res_x2[b, c])
        zeros = torch.zeros_like(t)
        return zeros.index_put((b, c), m2), zeros.index_put((b, c), res2)


class TridiagonalTerms:
    """The "tridiagonal" backend: the same sums without eigenvectors, on the CPU.

    Tridiagonalising A = H T H^T is cheaper than an eigendecomposition with vectors. The fixed
    point needs the eigenvalues (for gamma and log det: those of T, by dsterf) and two
    quadratic forms in the resolvent, which one shifted tridiagonal solve
    w = (T + tI)^-1 H^T z gives per (source, label column) in O(m):

        feature side: m2 = |w|^2,              res2 = |y|^2 - z.w - t |w|^2
        kernel side:  m2 = z.w - t |w|^2,      res2 = t^2 |w|^2 + |y|^2 - |z|^2

    Build it with ``feature_side`` (n > D: Gram, reduction and all, compiled and run in
    parallel over sources), ``kernel_side`` (small targets: a small Gram per source) or
    ``from_grams`` (given kernels). Attributes: sigma, keep (B, m) as in ``EigTerms``.
    """

    def __init__(self, diag: np.ndarray, off: np.ndarray, z: np.ndarray, sigma: np.ndarray,
                 kernel_side: bool, yy: torch.Tensor, drop_null: int = 0) -> None:
        self.diag, self.off, self.z = diag, off, z  # (B, m), (B, m-1), (B, C, m)
        sigma = torch.from_numpy(sigma).abs()  # as in EigTerms
        self.keep = _kept(sigma, kernel_side, drop_null)
        self.sigma = torch.where(self.keep, sigma, 0.0)
        self.kernel_side = kernel_side
        self.yy = yy.cpu().numpy()[None, :]
        self.zz = (self.z * self.z).sum(2)
        self.shape = (z.shape[0], z.shape[1])  # (sources, label columns)

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
    def from_grams(cls, gram: torch.Tensor, rhs: torch.Tensor, yy: torch.Tensor,
                   drop_null: int = 0) -> "TridiagonalTerms":
        """Kernel-side terms of given Gram matrices (B, m, m), m > 1, and right-hand sides
        (B, m, C), reduced in parallel by a compiled loop over LAPACK (dsytrd, dormqr, dsterf).
        ``drop_null``: see ``_kept``."""
        from scipy.linalg import lapack
        from threadpoolctl import threadpool_limits

        from ._kernels import reduce_symmetric

        z = np.ascontiguousarray(rhs.transpose(1, 2).numpy(), dtype=np.float64)
        lwork = int(lapack.dsytrd_lwork(gram.shape[1], lower=1)[0])
        with threadpool_limits(1):
            diag, off, sigma = reduce_symmetric(np.ascontiguousarray(gram.numpy(), dtype=np.float64), z, lwork)
        return cls(diag, off, z, sigma, True, yy, drop_null)

    @classmethod
    def kernel_side(cls, target: TargetStats, chunks) -> "TridiagonalTerms":
        """A = K K^T (n x n, n small) per source: K by a triangular and a dense product (R is
        upper-trapezoidal), A by a symmetric rank-k update and its reduction, compiled and run
        in parallel over sources, in float64 (``_kernels.reduce_kernel_side``)."""
        from scipy.linalg import lapack
        from threadpoolctl import threadpool_limits

        from ._kernels import reduce_kernel_side

        r = np.ascontiguousarray(target.r.cpu().numpy())
        qty = target.qty.T.cpu().numpy()  # (C, q): every source starts from Q^T y
        lwork = int(lapack.dsytrd_lwork(r.shape[0], lower=1)[0])
        parts = []
        for w, b in chunks:
            z = np.ascontiguousarray(np.broadcast_to(qty, (w.shape[0], *qty.shape)))
            with threadpool_limits(1):  # one BLAS thread per source, sources in parallel
                diag, off, sigma = reduce_kernel_side(r, _numba_float(w), _numba_float(b), z, lwork)
            parts.append((diag, off, z, sigma))
        diag, off, z, sigma = (np.concatenate(p) for p in zip(*parts))
        return cls(diag, off, z, sigma, True, target.yy)

    def sums(self, t: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """m2 and res2 (B, C) at t (B, C); with ``active`` (B, C), solved only for those pairs
        (the others hold no meaningful value)."""
        from ._kernels import resolvent_sums

        tn = t.numpy()
        mask = np.ones(tn.shape, dtype=np.bool_) if active is None else active.numpy()
        zw, ww = resolvent_sums(self.diag, self.off, self.z, tn, mask)
        if self.kernel_side:
            m2, res2 = zw - tn * ww, tn * tn * ww + self.yy - self.zz
        else:
            m2, res2 = ww, self.yy - zw - tn * ww
        return torch.from_numpy(m2), torch.from_numpy(res2)


def _numba_float(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as an array the compiled kernels take (numba has no float16)."""
    return (t.float() if t.dtype not in (torch.float32, torch.float64) else t).numpy()


def fixed_point(terms: EigTerms | TridiagonalTerms, n: int, out_dim: int, *, loop: str, extra_zeros: int = 0,
                weight: torch.Tensor | None = None, params: bool = False):
    """The module docstring's iteration for every (source, label column) pair of ``terms`` at
    once, run by ``loop`` (COMPILED: ``EigTerms`` on a CPU only; TORCH: any terms); returns
    the mean evidence per example of each source, shape (B,) (and alpha, beta (B, C) with
    ``params``). ``extra_zeros``: kept zero eigenvalues that are not in ``terms.sigma``, each
    adding log(alpha) to log det. ``weight`` (C,): the columns' weights in the mean (None: equal)."""
    alpha, beta, m2, res2 = (_compiled_loop if loop == COMPILED else _torch_loop)(terms, n)
    score = _evidence(alpha, beta, terms.sigma, terms.keep, m2, res2, n, out_dim, extra_zeros, weight)
    return (score, alpha, beta) if params else score


def _torch_loop(terms: EigTerms | TridiagonalTerms, n: int) -> tuple[torch.Tensor, ...]:
    """Batched: every pair steps together; a converged pair keeps its values and its sums are
    no longer asked for. Returns alpha, beta, m2, res2 (B, C)."""
    sigma = terms.sigma.unsqueeze(-1)  # (B, k, 1)
    kept = terms.keep.unsqueeze(-1).to(sigma.dtype)
    alpha = torch.ones(terms.shape, dtype=sigma.dtype, device=sigma.device)
    beta = torch.ones_like(alpha)
    m2 = torch.zeros_like(alpha)
    res2 = torch.zeros_like(alpha)
    active = torch.ones(terms.shape, dtype=torch.bool, device=sigma.device)
    for _ in range(MAX_STEPS):
        t = alpha / beta  # (B, C)
        gamma_i = (kept * sigma / (sigma + t.unsqueeze(1))).sum(1)
        m2_i, res2_i = terms.sums(t, active)
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
    return alpha, beta, m2, res2


def _compiled_loop(terms: EigTerms, n: int) -> tuple[torch.Tensor, ...]:
    """The same iteration compiled, each pair stopping on its own (dense sums, CPU)."""
    from ._kernels import dense_fixed_point

    arrays = (terms.sigma.detach().numpy(), terms.keep.numpy(), terms.x2.detach().numpy(),
              terms.res_x2.detach().numpy())
    return tuple(map(torch.from_numpy, dense_fixed_point(*arrays, n, MAX_STEPS, RTOL, EPS)))


def _evidence(alpha, beta, sigma, keep, m2, res2, n: int, out_dim: int, extra_zeros: int,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """L / n averaged over label columns (the formula in the module docstring), with
    ``weight`` when one column stands for several absent classes. sigma, keep (B, k);
    alpha, beta, m2, res2 (B, C)."""
    sig, kept = sigma.unsqueeze(-1), keep.unsqueeze(-1).to(sigma.dtype)
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
    ``method``: "eigh", "tridiagonal" or "auto" (see ``choose_backend``; "tridiagonal" becomes
    "eigh" when n lies between D and d, where R is not square).
    """
    check_esm_batch(weights, biases, target.dim)
    if weights.shape[0] == 0:
        return np.zeros(0)
    device = target.r.device
    out_dim, (rq, width) = weights.shape[1], target.r.shape
    kernel_side = rq <= out_dim
    # n <= D, but [X, 1] has rank rq < n (a map wider than its input): the n x n kernel of F
    # has n - rq zero eigenvalues the rq x rq Gram lacks; hfselect keeps them (log det)
    extra = target.n - rq if kernel_side else 0
    backend = choose_backend(device, out_dim, method, eigh_up_to=EIGH_UP_TO, tridiagonal_ok=kernel_side or rq == width)
    chunks = [(weights[i:i + batch_size].to(device), biases[i:i + batch_size].to(device))
              for i in range(0, weights.shape[0], batch_size)]
    if backend.spectrum == TRIDIAGONAL:
        terms = (TridiagonalTerms.kernel_side if kernel_side else TridiagonalTerms.feature_side)(target, chunks)
        return fixed_point(terms, target.n, out_dim, loop=backend.loop, extra_zeros=extra, weight=target.weight).numpy()
    out = []
    for w, b in chunks:
        terms = EigTerms(*_gram(target, w, b), target.yy)
        out.append(fixed_point(terms, target.n, out_dim, loop=backend.loop, extra_zeros=extra,
                               weight=target.weight).cpu())
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
    extra = target.n - gram.shape[1] if kernel_side else 0
    rhs = target.qty.expand(len(gram), -1, -1)
    backend = choose_backend(gram.device, gram.shape[1], EIGH if differentiable else "auto", eigh_up_to=1)
    if backend.spectrum == TRIDIAGONAL:
        terms = TridiagonalTerms.from_grams(gram, rhs, target.yy, drop_null=null)
    else:
        terms = EigTerms(gram, rhs, True, target.yy, drop_null=null)
    if not differentiable:
        return fixed_point(terms, target.n, out_dim, loop=backend.loop, extra_zeros=extra, weight=target.weight)
    with torch.no_grad():
        _, alpha, beta = fixed_point(terms, target.n, out_dim, loop=backend.loop, extra_zeros=extra, params=True)
    m2, res2 = terms.sums(alpha / beta)
    return _evidence(alpha, beta, terms.sigma, terms.keep, m2, res2, target.n, out_dim, extra, target.weight)


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
    """One BLAS thread while queries run. A query is many small dense problems, and
    OpenBLAS's threads next to torch's and numba's OpenMP threads oversubscribe a small
    machine (BENCHMARKS.md section 6 has the latencies). Counted, so overlapping queries from
    several threads restore the process's setting only when the last one ends.
    (OpenBLAS builds on OpenMP keep the setting per thread: there only the first of
    overlapping queries runs limited, which costs speed, never results.)"""
    global _blas_users, _blas_limiter
    importlib.import_module("scipy.linalg")  # load scipy's own OpenBLAS first: only loaded libraries are limited
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
