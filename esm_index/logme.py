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
    gram_and_rhs,      per source: the Gram matrix of K and the matching right-hand side;
    EigTerms,          its spectrum (sigma, keep) and the sums m2, res2 at any t, by one of
    TridiagonalTerms     two backends (spectrum.py; ``choose_backend`` picks it)
    fixed_point        the iteration above on every (source, label column) pair, then L / n
    score_esms,        the entry points: full maps, or small Gram matrices of projected
    score_grams          targets (summary.py)

The fixed point has two loops: compiled on a CPU for the "eigh" backend, each pair stopping
on its own (``_kernels.dense_fixed_point``), and a batched torch loop for the rest.
Both loops do the step above and nothing else; the tests check them against each other and
against the reference.
"""

from __future__ import annotations

import importlib
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .checks import label_matrix
from .errors import InvalidESMError, InvalidTargetError, ModelMismatchError
from .spectrum import COMPILED, EIGH, TRIDIAGONAL, EigTerms, TridiagonalTerms, choose_backend, gram_and_rhs

MAX_STEPS = 50  # hfselect's limit on fixed-point steps
RTOL = 1e-3  # hfselect's convergence test on t = alpha / beta
EPS = 1e-5  # hfselect's regulariser in the alpha and beta updates

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

    def kernel_side(self, out_dim: int) -> bool:
        """Whether maps to ``out_dim`` dimensions score this target on the kernel side: R has
        no more rows than the maps have outputs (n <= D, a small target), so all its rows'
        directions enter the score (``score_esms``; the prefilter plans for it, prefilter.plan)."""
        return self.r.shape[0] <= out_dim


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
    kernel_side = target.kernel_side(out_dim)
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
        terms = EigTerms(*gram_and_rhs(target, w, b), target.yy)
        out.append(fixed_point(terms, target.n, out_dim, loop=backend.loop, extra_zeros=extra,
                               weight=target.weight).cpu())
    return torch.cat(out).numpy()


def score_grams(target: TargetStats, gram: torch.Tensor, out_dim: int, differentiable: bool = False,
                tail: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (B,) of a target whose QR factor R has few columns (a projected target), from
    the small kernels A = R S R^T (B, rq, rq). This is the exact LogME of the n x out_dim
    features such a target's F would be: as hfselect does, all n kernel eigenvalues count when
    n <= out_dim (the n - rq we do not form are zeros), and null directions are dropped when
    n > out_dim.

    ``differentiable``: gradients flow to ``gram``. They do not go through the iterations:
    the fixed point is where the evidence is stationary in alpha and beta, so (envelope
    theorem) the evidence at the converged alpha, beta, held fixed, has the same gradient -
    one backward pass through eigh instead of fifty through the loop.

    ``tail`` (t,): the kernel is block diagonal, ``gram`` then diag(``tail``), the same for
    every source; R has gram's rows plus t (summary.Pooled)."""
    kernel_side = target.n <= out_dim
    size = gram.shape[1] + (0 if tail is None else len(tail))
    null = 0 if kernel_side else size - min(target.r.shape[1], out_dim)  # rank <= both
    extra = target.n - size if kernel_side else 0
    rhs = target.qty.expand(len(gram), -1, -1)
    backend = choose_backend(gram.device, gram.shape[1], EIGH if differentiable or tail is not None else "auto",
                             eigh_up_to=1)
    if backend.spectrum == TRIDIAGONAL:
        terms = TridiagonalTerms.from_grams(gram, rhs, target.yy, drop_null=null)
    else:
        terms = EigTerms(gram, rhs, True, target.yy, drop_null=null, tail=tail)
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
