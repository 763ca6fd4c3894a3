"""How an ESM [W, b] is written as bytes in the store: the encodings ``esm-index init --dtype`` offers.

An index picks one encoding at creation (its manifest's ``esm_dtype``) and keeps it. Every
stored map decodes to float W (D, d) and b (D,), so the scorer, the summaries and ``export``
need not know which encoding it is. Sizes at D = d = 384:

    float32         W then b, little-endian float32: exact (591 kB)
    float16         the same in float16, the default (296 kB); a score moves by < 1e-3
    float16-factor  the upper triangle of R, where [W, b] = Q R, as R - I in float16 (149 kB)

Why a factor. ESM-LogME depends on a map only through its metric [W,b]^T [W,b] (logme.py):
a map rotated in its output space, Q^T [W, b], scores exactly as the map does. The QR
factor R is such a rotation and is upper triangular, so half its entries are zero and need
not be stored. Because the shipped maps are near the identity, R is too, and storing R - I
lets float16 resolve the diagonal as finely as the rest. The price: a decoded (and exported)
map is the rotation R, not W: the same scores and rankings, other output coordinates.

Chosen by measurement (tools/bench/bench_encoding.py, BENCHMARKS.md §10): on the shipped
pool's real maps and real targets, R - I in float16 moves a score by about as much as plain
float16 does and kept every target's exact top-5, while the int8 and int4 candidates (of
W - I, of R - I, of the SVD factor) and low-rank W - I moved scores 18-630 times more and
reordered some top-5s.

Byte layouts are little-endian and fixed by (D, d), so a wrong length is always noticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import IndexStoreError, InvalidArgumentError, InvalidESMError
from .logme import one_blas_thread

DEFAULT_ENCODING = "float16"


def _finite(*arrays: np.ndarray) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


@dataclass(frozen=True)
class FloatEncoding:
    """W (row-major) then b, as raw little-endian floats of ``dtype`` (the original format)."""

    name: str
    dtype: str  # "<f2" or "<f4"

    @property
    def description(self) -> str:
        return f"W then b in {np.dtype(self.dtype).name}"

    def nbytes(self, out_dim: int, dim: int) -> int:
        return np.dtype(self.dtype).itemsize * out_dim * (dim + 1)

    def encode(self, weight: np.ndarray, bias: np.ndarray) -> bytes:
        with np.errstate(over="ignore"):
            w = np.ascontiguousarray(weight, self.dtype)
            b = np.ascontiguousarray(bias, self.dtype)
        if not _finite(w, b):
            raise InvalidESMError(f"ESM weights do not fit in {np.dtype(self.dtype).name} (overflow)")
        return w.tobytes() + b.tobytes()

    def decode(self, raw: bytes, out_dim: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) as read-only views of ``raw`` in the stored dtype (the store casts whole
        batches to float32 at once, which is faster than one map at a time)."""
        _check_size(raw, self.nbytes(out_dim, dim))
        arr = np.frombuffer(raw, self.dtype)
        return arr[:out_dim * dim].reshape(out_dim, dim), arr[out_dim * dim:]


@dataclass(frozen=True)
class FactorEncoding:
    """The triangular factor R of [W, b] = Q R (Q orthogonal), R - I stored in float16: only
    the upper triangle, row by row (row i holds columns i..d), little-endian.

    Decodes to the map (R[:, :d], R[:, d]), which is [W, b] rotated by Q^T: every score,
    summary and ranking is that of the map added (ESM-LogME sees a map only through
    [W,b]^T [W,b] = R^T R), but the map's output coordinates are not the original ones. Rows
    past min(D, d+1) of R are zero and not stored, so the output dimension stays D. The diagonal
    is made positive (R near I for maps near I), and I is subtracted so float16 resolves R's
    diagonal as finely as its small off-diagonal entries."""

    name: str = "float16-factor"
    description: str = "the triangular factor R of [W,b] = QR (a rotation of the map), R - I in float16"

    def nbytes(self, out_dim: int, dim: int) -> int:
        return 2 * len(_triangle(out_dim, dim)[0])

    def encode(self, weight: np.ndarray, bias: np.ndarray) -> bytes:
        aug = np.hstack([np.asarray(weight, np.float64), np.asarray(bias, np.float64)[:, None]])
        if not _finite(aug):
            raise InvalidESMError("ESM weights contain NaN or infinity")
        with one_blas_thread():  # threaded BLAS on one small QR is many times slower on a busy machine
            r = np.linalg.qr(aug, mode="r")  # (min(D, d+1), d+1)
        r *= np.where(np.diagonal(r) < 0, -1.0, 1.0)[:, None]
        flat, diagonal = _triangle(*weight.shape)
        with np.errstate(over="ignore"):
            values = r.reshape(-1)[flat].astype("<f2")  # r has d+1 columns, as the decoded R
            values[diagonal] = (r.reshape(-1)[flat[diagonal]] - 1.0).astype("<f2")
        if not _finite(values):
            raise InvalidESMError("ESM weights do not fit in float16 (overflow)")
        return values.tobytes()

    def decode(self, raw: bytes, out_dim: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) in float32, new arrays: R with its zero rows, split into W and b."""
        _check_size(raw, self.nbytes(out_dim, dim))
        flat, diagonal = _triangle(out_dim, dim)
        r = np.zeros((out_dim, dim + 1), np.float32)
        r.reshape(-1)[flat] = np.frombuffer(raw, "<f2")
        r.reshape(-1)[flat[diagonal]] += 1.0
        return r[:, :dim], r[:, dim].copy()


Encoding = FloatEncoding | FactorEncoding

ENCODINGS: dict[str, Encoding] = {
    "float16": FloatEncoding("float16", "<f2"),
    "float32": FloatEncoding("float32", "<f4"),
    "float16-factor": FactorEncoding(),
}


def get_encoding(name: str) -> Encoding:
    """The encoding called ``name``; an unknown name is an ``InvalidArgumentError``."""
    try:
        return ENCODINGS[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown ESM encoding {name!r}; one of {', '.join(ENCODINGS)}") from None


@lru_cache(maxsize=8)
def _triangle(out_dim: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Where R's stored entries are: flat positions in a row-major (out_dim, d+1) array of the
    upper triangle of its first min(D, d+1) rows, row by row, and which of them are diagonal."""
    rows, cols = np.triu_indices(min(out_dim, dim + 1), 0, dim + 1)
    return rows * (dim + 1) + cols, np.flatnonzero(rows == cols)


def _check_size(raw: bytes, expected: int) -> None:
    if len(raw) != expected:
        raise IndexStoreError(f"stored ESM has {len(raw)} bytes, expected {expected}")
