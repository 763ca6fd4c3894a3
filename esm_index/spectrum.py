"""The spectrum of a batch of ESM-mapped targets: the eigenvalues sigma and the sums m2, res2
that LogME's fixed point needs (logme.py's docstring has the formulas), by two backends.

Per source the score depends only on the Gram matrix of K = R [W, b]^T (R from the QR of the
target's [X, 1]) and a matching right-hand side (``gram_and_rhs``). Two ways to get what
the fixed point asks of that Gram matrix:

    EigTerms          "eigh": a batched eigendecomposition with vectors, so x = U^T y is
                      explicit and m2, res2 are dense sums. Runs anywhere, differentiable.
    TridiagonalTerms  "tridiagonal": A = H T H^T, the eigenvalues of T, and per step one
                      shifted tridiagonal solve for m2 and res2; CPU only, compiled
                      (``_kernels``), parallel over sources.

``choose_backend`` is the one place a backend is picked. Kept apart from logme.py so that the
estimator reads as its formulas; this module is how they are fed quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .logme import TargetStats

RANK_TOL = 1e-10  # hfselect drops singular values at or below this (when n > D)

EIGH, TRIDIAGONAL = "eigh", "tridiagonal"  # how the spectrum and the sums are computed
COMPILED, TORCH = "compiled", "torch"  # which loop runs the fixed point


def gram_and_rhs(target: TargetStats, weights: torch.Tensor,
                 biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
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

    gram (B, m, m) and rhs (B, m, C) from ``gram_and_rhs``: on the kernel side
    x = V^T (Q^T y); on the feature side rhs is F^T y and x_i = v_i^T rhs / s_i. ``drop_null``: see ``_kept``.
    ``tail`` (t,): a kernel-side Gram that is block diagonal, ``gram`` then the fixed diagonal
    ``tail`` (the same for every source), with rhs (B, m + t, C) (summary.Pooled).
    Attributes: sigma, keep (B, m) (dropped eigenvalues are 0 in sigma), x2 (B, m, C) the
    squared x (0 where dropped), res_x2 (B, C) = |y|^2 - |x|^2.
    """

    def __init__(self, gram: torch.Tensor, rhs: torch.Tensor, kernel_side: bool, yy: torch.Tensor,
                 drop_null: int = 0, tail: torch.Tensor | None = None) -> None:
        if gram.device.type == "cpu" and not gram.requires_grad:  # numpy's batched eigh is faster on small CPU matrices
            sigma, vecs = (torch.from_numpy(a) for a in np.linalg.eigh(gram.numpy()))
        else:
            sigma, vecs = torch.linalg.eigh(gram)
        proj = vecs.transpose(1, 2) @ rhs[:, :gram.shape[1]]  # (B, m, C)
        if tail is not None:  # kernel side, Gram [[gram, 0], [0, diag(tail)]]: rhs's last rows are on tail
            sigma = torch.cat([sigma, tail.to(sigma).expand(len(sigma), -1)], 1)
            proj = torch.cat([proj, rhs[:, gram.shape[1]:]], 1)
        sigma = sigma.abs()  # hfselect takes an SVD of the Gram: rounding noise counts as |lambda|
        if tail is not None:  # ascending, as eigh gives them (``_kept`` drops the smallest)
            order = sigma.argsort(1)
            sigma, proj = sigma.gather(1, order), proj.gather(1, order.unsqueeze(-1).expand_as(proj))
        self.keep = _kept(sigma, kernel_side, drop_null)
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
