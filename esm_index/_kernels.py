"""Compiled inner loops of the CPU scorer (numba): the per-source reduction and the shifted
tridiagonal solves of the fixed point, both parallel over sources.

Kept apart from logme.py so that importing the scorer does not import numba. The first call
in a fresh install compiles them; numba caches the machine code on disk next to this file, so
later processes only load it.
"""

import ctypes

import numba
import numpy as np
from numba import prange
from numba.extending import get_cython_function_address


@numba.njit(cache=True, parallel=True)
def resolvent_sums(diag, off, z, t, active):  # pragma: no cover - compiled
    """For each active (source b, column c): w = (T_b + t I)^-1 z_bc by the Thomas algorithm
    (T_b + t I is positive definite, so no pivoting), and return z.w and w.w.

    diag (B, m), off (B, m-1), z (B, C, m), t and active (B, C).
    """
    batch, cols, m = z.shape
    zw = np.zeros((batch, cols))
    ww = np.zeros((batch, cols))
    for b in prange(batch):
        piv = np.empty(m)
        y = np.empty(m)
        w = np.empty(m)
        d = diag[b]
        e = off[b]
        for c in range(cols):
            if not active[b, c]:
                continue
            shift = t[b, c]
            rhs = z[b, c]
            piv[0] = d[0] + shift
            y[0] = rhs[0]
            for i in range(1, m):
                ratio = e[i - 1] / piv[i - 1]
                piv[i] = d[i] + shift - ratio * e[i - 1]
                y[i] = rhs[i] - ratio * y[i - 1]
            w[m - 1] = y[m - 1] / piv[m - 1]
            for i in range(m - 2, -1, -1):
                w[i] = (y[i] - e[i] * w[i + 1]) / piv[i]
            s_zw = 0.0
            s_ww = 0.0
            for i in range(m):
                s_zw += rhs[i] * w[i]
                s_ww += w[i] * w[i]
            zw[b, c] = s_zw
            ww[b, c] = s_ww
    return zw, ww


# ---- the per-source reduction, BLAS/LAPACK called from numba so sources run in parallel ----
# (scipy's f2py wrappers hold the GIL; its Cython LAPACK exports give raw function pointers)
_P = ctypes.c_void_p


def _fn(module: str, name: str, nargs: int):
    return ctypes.CFUNCTYPE(None, *([_P] * nargs))(get_cython_function_address(f"scipy.linalg.cython_{module}", name))


_dtrmm = _fn("blas", "dtrmm", 11)
_dsyrk = _fn("blas", "dsyrk", 10)
_dgemm = _fn("blas", "dgemm", 13)
_dsytrd = _fn("lapack", "dsytrd", 10)
_dormqr = _fn("lapack", "dormqr", 13)
_dsterf = _fn("lapack", "dsterf", 4)


def reduce_feature_side(r, w_aug, z, lwork):
    """See ``_reduce_feature_side``; the LAPACK entry points are passed as arguments so that
    numba can cache the compiled code on disk (it cannot when they are globals)."""
    return _reduce_feature_side(r, w_aug, z, lwork, _dtrmm, _dsyrk, _dsytrd, _dormqr, _dsterf)


@numba.njit(cache=True, parallel=True)
def _reduce_feature_side(r, w_aug, z, lwork, dtrmm, dsyrk, dsytrd, dormqr, dsterf):  # pragma: no cover
    """For each source b (in parallel): K = R W~^T (dtrmm), A = K^T K (dsyrk), A = H T H^T
    (dsytrd), eigenvalues of T (dsterf) and H^T z (dormqr), all in float64.

    r (p, p) upper-triangular R of the target in C order (= R^T column-major, lower);
    w_aug (B, D, p) C order (= W~^T column-major); z (B, C, D) C order (= z column-major),
    overwritten by H^T z. Returns diag (B, D), off (B, D-1), eigenvalues (B, D).
    """
    batch, m, p = w_aug.shape
    diag = np.empty((batch, m))
    off = np.empty((batch, max(m - 1, 1)))
    sigma = np.empty((batch, m))
    chars = np.array([ord("L"), ord("T"), ord("N")], dtype=np.uint8)  # 'L', 'T', 'N'
    for b in prange(batch):
        k = w_aug[b].copy()  # column-major p x m: W~^T
        a = np.zeros((m, m))  # column-major m x m
        ints = np.array([p, m], dtype=np.int32)
        dbl = np.array([1.0, 0.0])
        # K := R K  (op(A) = (R^T)^T with A = R^T lower, as r is C-ordered R)
        dtrmm(chars[0:].ctypes, chars[0:].ctypes, chars[1:].ctypes, chars[2:].ctypes, ints[0:].ctypes,
               ints[1:].ctypes, dbl[0:].ctypes, r.ctypes, ints[0:].ctypes, k.ctypes, ints[0:].ctypes)
        # A := K^T K, lower triangle
        dsyrk(chars[0:].ctypes, chars[1:].ctypes, ints[1:].ctypes, ints[0:].ctypes, dbl[0:].ctypes, k.ctypes,
               ints[0:].ctypes, dbl[1:].ctypes, a.ctypes, ints[1:].ctypes)
        off[b], sigma[b] = _tridiagonalize_lower(a, z[b], lwork, diag[b], dsytrd, dormqr, dsterf)
    return diag, off, sigma


def reduce_kernel_side(r, weights, biases, z, lwork):
    """See ``_reduce_kernel_side`` (LAPACK entry points passed as arguments, as above)."""
    return _reduce_kernel_side(r, weights, biases, z, lwork, _dtrmm, _dgemm, _dsyrk, _dsytrd, _dormqr, _dsterf)


@numba.njit(cache=True, parallel=True)
def _reduce_kernel_side(r, weights, biases, z, lwork, dtrmm, dgemm, dsyrk, dsytrd, dormqr, dsterf):  # pragma: no cover
    """The small-target side (n <= D) of ``_reduce_feature_side``: for each source b (in
    parallel), K = R W~^T, A = K K^T (n x n), A = H T H^T, eigenvalues of T and H^T z.

    r (q, p) upper-trapezoidal R of the target in C order, q <= p = d + 1: R = [R1 | R2]
    with R1 (q x q) upper-triangular, so K = R1 W~^T[:q] (dtrmm, in place) + R2 W~^T[q:]
    (dgemm). weights (B, D, d) and biases (B, D) of any float type: W~ = [W, b] is built
    here, in float64, one source at a time. z (B, C, q) C order, overwritten by H^T z.
    Returns diag (B, q), off (B, q-1), eigenvalues (B, q).
    """
    batch, m, d = weights.shape
    p = d + 1
    q = r.shape[0]
    diag = np.empty((batch, q))
    off = np.empty((batch, max(q - 1, 1)))
    sigma = np.empty((batch, q))
    chars = np.array([ord("L"), ord("T"), ord("N")], dtype=np.uint8)  # 'L', 'T', 'N'
    for b in prange(batch):
        k = np.empty((m, p))  # C order (D, p) = column-major p x D: W~^T; its first q rows become K
        k[:, :d] = weights[b]
        k[:, d] = biases[b]
        tail = k[:, q:].copy()  # W~^T[q:] apart (leading dimension p - q): dgemm's B must not share k with its C
        a = np.zeros((q, q))  # column-major q x q
        ints = np.array([p, m, q, p - q], dtype=np.int32)
        dbl = np.array([1.0, 0.0])
        # K[:q] := R1 W~^T[:q]  (r's first q columns, C order = R1^T column-major, lower)
        dtrmm(chars[0:].ctypes, chars[0:].ctypes, chars[1:].ctypes, chars[2:].ctypes, ints[2:].ctypes,
               ints[1:].ctypes, dbl[0:].ctypes, r.ctypes, ints[0:].ctypes, k.ctypes, ints[0:].ctypes)
        if p > q:  # K[:q] += R2 W~^T[q:]  (R2^T column-major starts at r[0, q], leading dimension p)
            dgemm(chars[1:].ctypes, chars[2:].ctypes, ints[2:].ctypes, ints[1:].ctypes, ints[3:].ctypes,
                  dbl[0:].ctypes, r[0, q:].ctypes, ints[0:].ctypes, tail.ctypes, ints[3:].ctypes,
                  dbl[0:].ctypes, k.ctypes, ints[0:].ctypes)
        # A := K K^T, lower triangle (K is q x D with leading dimension p)
        dsyrk(chars[0:].ctypes, chars[2:].ctypes, ints[2:].ctypes, ints[1:].ctypes, dbl[0:].ctypes, k.ctypes,
              ints[0:].ctypes, dbl[1:].ctypes, a.ctypes, ints[2:].ctypes)
        off[b], sigma[b] = _tridiagonalize_lower(a, z[b], lwork, diag[b], dsytrd, dormqr, dsterf)
    return diag, off, sigma


@numba.njit(cache=True)
def _tridiagonalize_lower(a, zb, lwork, d, dsytrd, dormqr, dsterf):  # pragma: no cover - compiled
    """One symmetric m x m matrix a (lower triangle, column-major; overwritten): A = H T H^T
    (dsytrd, diagonal into d), H^T z for zb (C, m) in place (dormqr), eigenvalues of T
    (dsterf). Returns (off-diagonal of T, eigenvalues ascending)."""
    m = a.shape[0]
    cols = zb.shape[0]
    chars = np.array([ord("L"), ord("T")], dtype=np.uint8)  # 'L', 'T'
    tau = np.empty(max(m - 1, 1))
    work = np.empty(max(lwork, cols * 64))
    ints = np.array([m, lwork, 0, m - 1, cols, cols * 64], dtype=np.int32)
    e = np.zeros(max(m - 1, 1))
    dsytrd(chars[0:].ctypes, ints[0:].ctypes, a.ctypes, ints[0:].ctypes, d.ctypes, e.ctypes, tau.ctypes,
           work.ctypes, ints[1:].ctypes, ints[2:].ctypes)
    if m > 1:
        # the reflectors sit below the subdiagonal: the QR-form block A[1:, :m-1]
        dormqr(chars[0:].ctypes, chars[1:].ctypes, ints[3:].ctypes, ints[4:].ctypes, ints[3:].ctypes,
               a[0, 1:].ctypes, ints[0:].ctypes, tau.ctypes, zb[0, 1:].ctypes, ints[0:].ctypes,
               work.ctypes, ints[5:].ctypes, ints[2:].ctypes)
    ev = d.copy()
    e2 = e.copy()
    dsterf(ints[0:].ctypes, ev.ctypes, e2.ctypes, ints[2:].ctypes)
    return e, ev


@numba.njit(cache=True, parallel=True)
def dense_fixed_point(sigma, kept, x2, res_x2, n, max_steps, rtol, eps):  # pragma: no cover - compiled
    """The fixed point of logme.py's docstring per (source b, column c) from a full
    spectrum: sigma and kept (B, k), x2 (B, k, C) squared projections of y, res_x2 (B, C) =
    |y|^2 - sum x2. Each pair stops on its own (logme._torch_loop steps every pair together).
    Returns alpha, beta, m2, res2 (B, C) as the torch loop leaves them."""
    batch, k, cols = x2.shape
    alpha = np.ones((batch, cols))
    beta = np.ones((batch, cols))
    m2 = np.zeros((batch, cols))
    res2 = np.zeros((batch, cols))
    for b in prange(batch):
        for c in range(cols):
            a, be = 1.0, 1.0
            for _ in range(max_steps):
                t = a / be
                gamma = 0.0
                m = 0.0
                r = res_x2[b, c]
                for i in range(k):
                    s = sigma[b, i]
                    x = x2[b, i, c]
                    if kept[b, i]:
                        gamma += s / (s + t)
                    m += s * x / ((t + s) * (t + s))
                    r += x / ((1.0 + s / t) * (1.0 + s / t))
                a = gamma / (m + eps)
                be = (n - gamma) / (r + eps)
                m2[b, c] = m
                res2[b, c] = r
                if abs(a / be - t) / t <= rtol:
                    break
            alpha[b, c] = a
            beta[b, c] = be
    return alpha, beta, m2, res2


def reduce_symmetric(gram, z, lwork):
    """See ``_reduce_symmetric`` (LAPACK entry points passed as arguments, as above)."""
    return _reduce_symmetric(gram, z, lwork, _dsytrd, _dormqr, _dsterf)


@numba.njit(cache=True, parallel=True)
def _reduce_symmetric(gram, z, lwork, dsytrd, dormqr, dsterf):  # pragma: no cover - compiled
    """For each symmetric gram[b] (m x m, in parallel): A = H T H^T (dsytrd), eigenvalues of
    T (dsterf) and H^T z (dormqr). The small problems of the prefilter's stages: cheaper
    than an eigendecomposition with vectors, and parallel over sources.

    gram (B, m, m) float64 (symmetric, so C order is column-major); z (B, C, m) C order,
    overwritten by H^T z. Returns diag (B, m), off (B, m-1), eigenvalues (B, m) ascending.
    """
    batch, m, _ = gram.shape
    diag = np.empty((batch, m))
    off = np.empty((batch, max(m - 1, 1)))
    sigma = np.empty((batch, m))
    for b in prange(batch):
        off[b], sigma[b] = _tridiagonalize_lower(gram[b].copy(), z[b], lwork, diag[b], dsytrd, dormqr, dsterf)
    return diag, off, sigma
