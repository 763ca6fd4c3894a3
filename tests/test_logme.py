"""The scorer: agreement with hfselect's LogME, invariances that follow from the maths,
and refusal of bad inputs."""

import contextlib
import io

import numpy as np
import pytest
import torch

from esm_index.errors import InvalidESMError, InvalidTargetError, ModelMismatchError
from esm_index.logme import TargetStats, logme, score_esms

hfselect_logme = pytest.importorskip("hfselect.logme")


def _reference(x, w, b, labels, regression=False):
    mapped = (x @ w.T + b).astype(np.float32)
    y = labels.astype(np.float32) if regression else labels
    return hfselect_logme.LogME(regression=regression).fit(mapped, y)


@pytest.mark.parametrize("n,d,classes", [(300, 24, 3), (15, 24, 4), (200, 48, 7)])
def test_classification_matches_hfselect(n, d, classes):
    rng = np.random.default_rng(n + d)
    x = (rng.standard_normal((n, d)) + 0.3).astype(np.float32)
    labels = rng.integers(0, classes, n)
    w = (rng.standard_normal((5, d, d)) * 0.3).astype(np.float32)
    b = rng.standard_normal((5, d)).astype(np.float32)
    stats = TargetStats.from_embeddings(x, labels)
    ref = [_reference(x, w[i], b[i], labels) for i in range(5)]
    for method in ("eigh", "tridiagonal"):
        ours = score_esms(stats, torch.from_numpy(w), torch.from_numpy(b), batch_size=2, method=method)
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["eigh", "tridiagonal"])
def test_rank_deficient_features_match_hfselect(method):
    """Real sentence embeddings are exactly rank-deficient ([X, 1] has null directions:
    LayerNorm makes a weighted sum of the dimensions constant). hfselect keeps those
    directions (their rounding-noise eigenvalues pass its threshold); so must we."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((400, 24))
    x[:, 0] = 1.0 - x[:, 1:].sum(1)  # an exact linear relation with the constant
    x[:, 5] = 0.0  # and a dead dimension
    x = x.astype(np.float32)
    labels = (x[:, 2] + 0.3 * rng.standard_normal(400) > 0).astype(int) + (x[:, 3] > 1)
    w = (np.eye(24) + 0.2 * rng.standard_normal((3, 24, 24))).astype(np.float32)
    b = rng.standard_normal((3, 24)).astype(np.float32)
    ours = score_esms(TargetStats.from_embeddings(x, labels), torch.from_numpy(w), torch.from_numpy(b), method=method)
    ref = [_reference(x, w[i], b[i], labels) for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert logme(x, labels) == pytest.approx(hfselect_logme.LogME().fit(x, labels), abs=1e-6)


def test_absent_classes_count_like_hfselect():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 10)).astype(np.float32)
    labels = rng.choice([0, 3, 5], 80)  # classes 1, 2, 4 absent
    assert logme(x, labels) == pytest.approx(hfselect_logme.LogME().fit(x, labels), abs=1e-8)


@pytest.mark.parametrize("n,d", [(80, 10), (30, 40)])
def test_sparse_class_ids_match_hfselect_with_one_column_per_present_class(n, d):
    """hfselect averages over classes 0..max; the absent ones share one weighted zero column
    here (both sides of n vs d), with the same score."""
    from esm_index.logme import label_matrix

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.choice([0, 7, 300], n)
    y, weight = label_matrix(labels, regression=False)
    assert y.shape == (n, 4) and weight.sum() == pytest.approx(1.0) and weight[-1] == pytest.approx(298 / 301)
    with contextlib.redirect_stdout(io.StringIO()):  # hfselect's LogME prints per class
        reference = hfselect_logme.LogME().fit(x, labels)
    assert logme(x, labels) == pytest.approx(reference, abs=1e-9)


def test_huge_class_ids_cost_no_memory():
    """Labels {0, 10**12}: three columns, not 10**12 + 1. The score is that of classes
    {0, K} for every K, (e_0 + e_K + (K - 1) e_zero) / (K + 1), which two small K pin down."""
    from esm_index.logme import label_matrix

    rng = np.random.default_rng(9)
    x = rng.standard_normal((60, 12))
    picks = rng.integers(0, 2, 60)
    assert label_matrix(picks * 10**12, False)[0].shape == (60, 3)
    score = {k: logme(x, picks * k) for k in (10, 100, 10**12)}
    z = (score[100] * 101 - score[10] * 11) / 90
    a = score[10] * 11 - 9 * z
    assert score[10**12] == pytest.approx((a + (10**12 - 1) * z) / (10**12 + 1), abs=1e-9)


def test_scoring_memory_is_bounded_by_distinct_classes():
    """Issue 8's target: 300 examples labelled 0, 1000, ..., 299000. Materialising classes
    0..max took 718 MB for the label matrix alone (the whole query was killed at 23.8 GB);
    one column per distinct class keeps the peak of Python-side allocations small."""
    import tracemalloc

    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 32))
    w = torch.from_numpy(np.eye(32) + 0.1 * rng.standard_normal((8, 32, 32)))
    b = torch.zeros(8, 32, dtype=torch.float64)
    labels = np.arange(300) * 1000
    tracemalloc.start()
    try:
        scores = score_esms(TargetStats.from_embeddings(x, labels), w, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(scores).all() and peak < 20e6, peak


def test_constant_regression_labels_are_refused():
    with pytest.raises(InvalidTargetError, match="constant"):
        TargetStats.from_embeddings(np.random.default_rng(0).standard_normal((30, 4)), np.full(30, 2.5), True)


@pytest.mark.parametrize("columns", [1, 3])
def test_regression_matches_hfselect(columns):
    rng = np.random.default_rng(columns)
    x = rng.standard_normal((120, 16)).astype(np.float32)
    y = x[:, :columns] @ rng.standard_normal((columns, columns)) + 0.1 * rng.standard_normal((120, columns))
    labels = y[:, 0] if columns == 1 else y
    w = (rng.standard_normal((3, 16, 16))).astype(np.float32)
    b = np.zeros((3, 16), np.float32)
    ours = score_esms(TargetStats.from_embeddings(x, labels, regression=True), torch.from_numpy(w), torch.from_numpy(b))
    ref = [_reference(x, w[i], b[i], labels, regression=True) for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_orthogonal_rotation_of_the_output_leaves_the_score_unchanged():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 20))
    labels = (x[:, 0] + x[:, 1] > 0).astype(int)
    w = rng.standard_normal((20, 20))
    b = rng.standard_normal(20)
    rot, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    stats = TargetStats.from_embeddings(x, labels)
    both = score_esms(stats, torch.tensor(np.stack([w, rot @ w])), torch.tensor(np.stack([b, rot @ b])))
    assert both[0] == pytest.approx(both[1], abs=1e-9)


def test_the_score_depends_on_the_map():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 20))
    labels = (x[:, 0] > 0).astype(int)
    keep_signal = np.eye(20)
    kill_signal = np.eye(20)
    kill_signal[0, 0] = 0.0  # the map throws the label's direction away
    scores = score_esms(TargetStats.from_embeddings(x, labels), torch.tensor(np.stack([keep_signal, kill_signal])),
                        torch.zeros(2, 20, dtype=torch.float64))
    assert scores[0] > scores[1] + 0.05


def test_identity_map_equals_plain_logme():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 150)
    assert logme(x, labels) == pytest.approx(hfselect_logme.LogME().fit(x, labels), abs=1e-9)


def test_uniform_scaling_of_features_leaves_logme_unchanged():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16))
    labels = (x[:, 0] > 0).astype(int)
    # Exact up to LogME's 1e-5 regulariser in the alpha/beta updates.
    assert logme(3.0 * x, labels) == pytest.approx(logme(x, labels), abs=1e-4)


def test_bad_targets_are_refused():
    x = np.zeros((10, 4))
    with pytest.raises(InvalidTargetError, match="single class"):
        TargetStats.from_embeddings(x, np.zeros(10, int))
    with pytest.raises(InvalidTargetError):
        TargetStats.from_embeddings(np.zeros((0, 4)), np.zeros(0, int))
    with pytest.raises(InvalidTargetError, match="numbers"):
        TargetStats.from_embeddings(x, np.array(["a"] * 10), regression=True)
    with pytest.raises(InvalidTargetError, match="labels"):
        TargetStats.from_embeddings(x, np.array([0, 1] * 4))
    with pytest.raises(InvalidTargetError, match="NaN"):
        TargetStats.from_embeddings(np.full((10, 4), np.nan), np.array([0, 1] * 5))


def test_bad_maps_are_refused():
    stats = TargetStats.from_embeddings(np.random.default_rng(0).standard_normal((10, 4)), np.array([0, 1] * 5))
    w = torch.eye(4).unsqueeze(0)
    with pytest.raises(InvalidESMError, match="NaN"):
        score_esms(stats, w * float("nan"), torch.zeros(1, 4))
    with pytest.raises(ModelMismatchError):
        score_esms(stats, torch.eye(5).unsqueeze(0), torch.zeros(1, 5))
    with pytest.raises(InvalidESMError):
        score_esms(stats, w, torch.zeros(1, 3))


@pytest.mark.parametrize("kernel_side", [True, False])
def test_compiled_fixed_point_equals_the_torch_loop(kernel_side):
    """The CPU path runs each (source, column) pair's fixed point in numba, stopping it on
    its own; the torch loop (GPU path) carries every pair along. Same numbers."""
    from esm_index.logme import EigTerms, fixed_point

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((16, 20, 20)))
    gram = a @ a.transpose(1, 2) * torch.from_numpy(rng.uniform(0.01, 10, (16, 1, 1)))
    rhs = torch.from_numpy(rng.standard_normal((16, 20, 4)))
    terms = EigTerms(gram, rhs, kernel_side, (rhs * rhs).sum(1)[0] * 3)
    compiled = fixed_point(terms, terms.sigma, terms.keep, 50, 30, 4, params=True)
    looped = fixed_point(lambda t, active: terms(t), terms.sigma, terms.keep, 50, 30, 4, params=True)
    for c, lp in zip(compiled, looped):
        torch.testing.assert_close(c, lp, rtol=1e-10, atol=1e-12)


def test_one_blas_thread_restores_the_setting_after_overlapping_queries():
    """A query limits BLAS to one thread; overlapping queries from several threads leave the
    process's setting as it was once the last one ends. (Some OpenBLAS builds keep the
    setting per thread, so what another thread sees meanwhile is not asserted.)"""
    import threading

    from threadpoolctl import threadpool_info

    from esm_index.logme import one_blas_thread

    def blas_threads():
        return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    before = blas_threads()
    with one_blas_thread():
        assert 1 in blas_threads().values()
    assert blas_threads() == before
    inside, release = threading.Event(), threading.Event()

    def query():
        with one_blas_thread():
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=query)
    worker.start()
    inside.wait(5)
    with one_blas_thread():
        pass
    release.set()
    worker.join()
    assert blas_threads() == before
