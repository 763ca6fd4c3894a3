"""The one loop numpy cannot vectorise: shifted tridiagonal solves, compiled with numba.

Kept apart from logme.py so that importing the scorer does not import numba; the first call
compiles (about a second) and the result is cached on disk next to this file.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def resolvent_sums(diag, off, z, t, active):  # pragma: no cover - compiled
    """For each active (source b, column c): w = (T_b + t I)^-1 z_bc by the Thomas algorithm
    (T_b + t I is positive definite, so no pivoting), and return z.w and w.w.

    diag (B, m), off (B, m-1), z (B, C, m), t and active (B, C).
    """
    batch, cols, m = z.shape
    zw = np.zeros((batch, cols))
    ww = np.zeros((batch, cols))
    piv = np.empty(m)
    y = np.empty(m)
    w = np.empty(m)
    for b in range(batch):
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
