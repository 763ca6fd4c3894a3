"""LogME written plainly, the test oracle for esm_index/logme.py: numpy only, one label column
at a time, no QR, no batching. It is thuml/LogME's ``LogME._fit_fixed_point`` (You et al.,
"Ranking and Tuning Pre-trained Models", 2021) with hfselect.logme's 50-step limit.

F (N, D) features, y (N,) one label column:
    F = U diag(s) V^T, k kept singular values, sigma = s^2, x = U^T y
    repeat: t = alpha / beta
            gamma = sum sigma / (sigma + t)             m2 = sum sigma x^2 / (t + sigma)^2
            res2 = sum x^2 / (1 + sigma / t)^2 + |y|^2 - |x|^2
            alpha = gamma / (m2 + 1e-5)                 beta = (N - gamma) / (res2 + 1e-5)
    until |alpha / beta - t| / t <= 1e-3
    L = D/2 log alpha + N/2 log beta - 1/2 sum log(alpha + beta sigma)
        - beta/2 res2 - alpha/2 m2 - N/2 log 2 pi;     LogME = mean over columns of L / N
"""

import numpy as np


def reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    """LogME of features f (N, D) for label columns y (N, C): one-hot classes 0..max(label)
    (see ``one_hot``) or regression targets."""
    f, y = np.asarray(f, np.float64), np.asarray(y, np.float64).reshape(len(f), -1)
    n, d = f.shape
    if n > d:  # thuml's truncated_svd: through F^T F (D, D), dropping s <= 1e-10
        _, s, vh = np.linalg.svd(f.T @ f)  # s (D,) eigenvalues of F^T F, vh (D, D)
        s = np.sqrt(s)
        k = int((s > 1e-10).sum())
        s, u = s[:k], (f @ vh.T)[:, :k] / s[:k]  # s (k,), u (N, k)
    else:  # every one of the N singular values counts
        u, s, _ = np.linalg.svd(f, full_matrices=False)  # u (N, N), s (N,)
    sigma = s**2  # (k,)
    evidences = []
    for y_c in y.T:  # (N,)
        x2 = (u.T @ y_c) ** 2  # (k,)
        res_x2 = y_c @ y_c - x2.sum()  # |y|^2 outside span(U)
        alpha, beta = 1.0, 1.0
        for _ in range(50):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def one_hot(labels: np.ndarray) -> np.ndarray:
    """(N, max + 1) indicator columns of classes 0..max(label), absent classes included."""
    labels = np.asarray(labels)
    return (labels[:, None] == np.arange(labels.max() + 1)).astype(np.float64)
