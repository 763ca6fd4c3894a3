"""The scorer: agreement with the plain reference LogME (tests/reference_logme.py) and with
hfselect's LogME, invariances that follow from the maths, the backends against each other,
and refusal of bad inputs. Only the comparisons with hfselect need it installed."""

import contextlib
import io

import numpy as np
import pytest
import torch

from esm_index.errors import InvalidESMError, InvalidTargetError, ModelMismatchError
from esm_index.logme import TargetStats, logme, score_esms
from reference_logme import one_hot, reference_logme

try:
    import hfselect.logme as hfselect_logme
except ImportError:  # pragma: no cover - hfselect is a test extra
    hfselect_logme = None
needs_hfselect = pytest.mark.skipif(hfselect_logme is None, reason="hfselect is not installed")


def by_reference(features, labels, regression=False):
    # regression labels go through float32 on both sides, as hfselect's data loader reads them
    y = np.asarray(labels, np.float32).astype(np.float64) if regression else one_hot(labels)
    return reference_logme(features, y)


def by_hfselect(features, labels, regression=False):
    y = np.asarray(labels, np.float32) if regression else labels
    with contextlib.redirect_stdout(io.StringIO()):  # hfselect's LogME prints per class
        return hfselect_logme.LogME(regression=regression).fit(np.asarray(features, np.float64), y)


# Both oracles get the mapped features in float64, as the scorer computes them: agreement to
# rounding, not to float32's 1e-7.
ORACLES = [pytest.param(by_reference, id="reference"), pytest.param(by_hfselect, id="hfselect", marks=needs_hfselect)]
TOL = 1e-9


def _mapped(x, w, b):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)


@needs_hfselect
def test_the_reference_is_hfselects_logme():
    """The oracle itself: thuml's formulas as hfselect runs them, on both sides of n vs D,
    with absent classes, rank-deficient features and regression."""
    rng = np.random.default_rng(12)
    for n, d in [(90, 20), (12, 30)]:
        x = rng.standard_normal((n, d))
        labels = rng.choice([0, 2, 5], n)
        assert by_reference(x, labels) == pytest.approx(by_hfselect(x, labels), abs=1e-12)
        y = x[:, :2] @ rng.standard_normal((2, 2)) + 0.1 * rng.standard_normal((n, 2))
        assert by_reference(x, y, True) == pytest.approx(by_hfselect(x, y, True), abs=1e-10)
    x = rng.standard_normal((90, 8))
    x[:, 0] = 1.0 - x[:, 1:].sum(1)
    labels = (x[:, 1] > 0).astype(int)
    assert by_reference(x, labels) == pytest.approx(by_hfselect(x, labels), abs=1e-12)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("n,d,classes", [(300, 24, 3), (15, 24, 4), (200, 48, 7)])
def test_classification_matches(oracle, n, d, classes):
    rng = np.random.default_rng(n + d)
    x = (rng.standard_normal((n, d)) + 0.3).astype(np.float32)
    labels = rng.integers(0, classes, n)
    w = (rng.standard_normal((5, d, d)) * 0.3).astype(np.float32)
    b = rng.standard_normal((5, d)).astype(np.float32)
    stats = TargetStats.from_embeddings(x, labels)
    expected = [oracle(_mapped(x, w[i], b[i]), labels) for i in range(5)]
    for method in ("eigh", "tridiagonal"):
        ours = score_esms(stats, torch.from_numpy(w), torch.from_numpy(b), batch_size=2, method=method)
        np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("n", [12, 9, 7])
def test_kernel_side_with_maps_wider_than_their_input(oracle, n):
    """n <= D with a map that widens (D = 16 > d = 8): R is square (n >= d + 1: no dense
    part R2, and F's n x n kernel has n - 9 zero eigenvalues the 9 x 9 Gram lacks), or
    trapezoidal (n < d + 1); both backends handle every case."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    labels = np.arange(n) % 3
    w = rng.standard_normal((4, 16, 8)).astype(np.float32)
    b = rng.standard_normal((4, 16)).astype(np.float32)
    stats = TargetStats.from_embeddings(x, labels)
    expected = [oracle(_mapped(x, w[i], b[i]), labels) for i in range(4)]
    for method in ("eigh", "tridiagonal"):
        ours = score_esms(stats, torch.from_numpy(w), torch.from_numpy(b), batch_size=3, method=method)
        np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("method", ["eigh", "tridiagonal"])
def test_rank_deficient_features_match(oracle, method):
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
    np.testing.assert_allclose(ours, [oracle(_mapped(x, w[i], b[i]), labels) for i in range(3)], atol=TOL, rtol=0)
    assert logme(x, labels) == pytest.approx(oracle(x, labels), abs=TOL)


@pytest.mark.parametrize("oracle", ORACLES)
def test_absent_classes_count_like_the_oracle(oracle):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 10)).astype(np.float32)
    labels = rng.choice([0, 3, 5], 80)  # classes 1, 2, 4 absent
    assert logme(x, labels) == pytest.approx(oracle(x, labels), abs=TOL)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("n,d", [(80, 10), (30, 40)])
def test_sparse_class_ids_match_with_one_column_per_present_class(oracle, n, d):
    """hfselect averages over classes 0..max; the absent ones share one weighted zero column
    here (both sides of n vs d), with the same score."""
    from esm_index.logme import label_matrix

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.choice([0, 7, 300], n)
    y, weight = label_matrix(labels, regression=False)
    assert y.shape == (n, 4) and weight.sum() == pytest.approx(1.0) and weight[-1] == pytest.approx(298 / 301)
    assert logme(x, labels) == pytest.approx(oracle(x, labels), abs=TOL)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("columns", [1, 3])
def test_regression_matches(oracle, columns):
    rng = np.random.default_rng(columns)
    x = rng.standard_normal((120, 16)).astype(np.float32)
    y = x[:, :columns] @ rng.standard_normal((columns, columns)) + 0.1 * rng.standard_normal((120, columns))
    labels = y[:, 0] if columns == 1 else y
    w = (rng.standard_normal((3, 16, 16))).astype(np.float32)
    b = np.zeros((3, 16), np.float32)
    ours = score_esms(TargetStats.from_embeddings(x, labels, regression=True), torch.from_numpy(w), torch.from_numpy(b))
    expected = [oracle(_mapped(x, w[i], b[i]), labels, regression=True) for i in range(3)]
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("oracle", ORACLES)
def test_identity_map_equals_plain_logme(oracle):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 150)
    assert logme(x, labels) == pytest.approx(oracle(x, labels), abs=TOL)


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
    one_bad = w.repeat(3, 1, 1)
    one_bad[1, 2, 3] = float("inf")
    with pytest.raises(InvalidESMError, match="infinity"):
        score_esms(stats, one_bad.half(), torch.zeros(3, 4))
    with pytest.raises(InvalidESMError, match="NaN"):
        score_esms(stats, w, torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ModelMismatchError):
        score_esms(stats, torch.eye(5).unsqueeze(0), torch.zeros(1, 5))
    with pytest.raises(InvalidESMError):
        score_esms(stats, w, torch.zeros(1, 3))


# ---- the backends against each other and against the reference ----------------------------
def _grams(seed, batch=16, size=20, columns=4, rank=20):
    """Random Gram matrices (batch, size, size) of the given rank, right-hand sides, |y|^2."""
    rng = np.random.default_rng(seed)
    a = torch.from_numpy(rng.standard_normal((batch, size, rank)))
    gram = a @ a.transpose(1, 2) * torch.from_numpy(rng.uniform(0.01, 10, (batch, 1, 1)))
    rhs = torch.from_numpy(rng.standard_normal((batch, size, columns)))
    return gram, rhs, (rhs * rhs).sum(1)[0] * 3


@pytest.mark.parametrize("kernel_side,drop_null", [(True, 0), (False, 0), (True, 5)])
def test_compiled_loop_equals_the_torch_loop(kernel_side, drop_null):
    """The CPU runs each (source, column) pair's fixed point compiled, stopping it on its own;
    the torch loop (GPU) steps every pair together, asking only the unfinished ones for their
    sums. Same numbers."""
    from esm_index.logme import fixed_point
    from esm_index.spectrum import COMPILED, TORCH, EigTerms

    gram, rhs, yy = _grams(0)
    terms = EigTerms(gram, rhs, kernel_side, yy, drop_null=drop_null)
    compiled = fixed_point(terms, 50, 30, loop=COMPILED, params=True)
    looped = fixed_point(terms, 50, 30, loop=TORCH, params=True)
    for c, lp in zip(compiled, looped):
        torch.testing.assert_close(c, lp, rtol=1e-10, atol=1e-12)


def test_eig_terms_sum_only_the_active_pairs():
    from esm_index.spectrum import EigTerms

    gram, rhs, yy = _grams(1)
    terms = EigTerms(gram, rhs, True, yy)
    t = torch.from_numpy(np.random.default_rng(2).uniform(0.1, 5, terms.shape))
    active = torch.from_numpy(np.random.default_rng(3).random(terms.shape) < 0.4)
    every, some = terms.sums(t), terms.sums(t, active)
    for full, part in zip(every, some):
        torch.testing.assert_close(part[active], full[active], rtol=1e-12, atol=0)
        assert (part[~active] == 0).all()


@pytest.mark.parametrize("drop_null", [0, 6])
def test_tridiagonal_terms_equal_eig_terms(drop_null):
    """The resolvent solves give the dense sums without eigenvectors, and the same spectrum
    (``drop_null`` leaves out eigenvalues that are structural zeros, as in ``score_grams``)."""
    from esm_index.spectrum import EigTerms, TridiagonalTerms

    gram, rhs, yy = _grams(4, rank=20 - drop_null)
    dense, tri = EigTerms(gram, rhs, True, yy, drop_null), TridiagonalTerms.from_grams(gram, rhs, yy, drop_null)
    assert torch.equal(dense.keep, tri.keep)
    torch.testing.assert_close(tri.sigma, dense.sigma, rtol=1e-9, atol=1e-9)
    t = torch.from_numpy(np.random.default_rng(5).uniform(0.1, 5, dense.shape))
    for a, b in zip(tri.sums(t), dense.sums(t)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,k,out_dim", [(15, 6, 20), (60, 12, 8)])
def test_small_grams_score_the_features_they_stand_for(n, k, out_dim):
    """``score_grams`` on A = R (W^T W) R^T for X = Q R is the LogME of the n x out_dim
    features X W^T: the kernel side counts the n - k eigenvalues it does not form, the
    feature side drops the k - out_dim structural zeros. Both backends."""
    from esm_index.logme import score_grams

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, k))
    labels = rng.integers(0, 3, n)
    w = torch.from_numpy(rng.standard_normal((4, out_dim, k)))
    q, r = torch.linalg.qr(torch.from_numpy(x))
    y = torch.from_numpy(one_hot(labels))
    target = TargetStats(r=r, qty=q.T @ y, yy=(y * y).sum(0), n=n, dim=k)
    gram = r @ (w.transpose(1, 2) @ w) @ r.T
    expected = [reference_logme(x @ w[i].numpy().T, one_hot(labels)) for i in range(4)]
    np.testing.assert_allclose(score_grams(target, gram, out_dim).numpy(), expected, atol=TOL, rtol=0)
    # the "eigh" backend; its value is the evidence at the converged alpha, beta (sums at the
    # final t, not the last step's), so it agrees to the iteration's tolerance, not rounding
    smooth = score_grams(target, gram, out_dim, differentiable=True)
    np.testing.assert_allclose(smooth.detach().numpy(), expected, atol=1e-6, rtol=0)


def test_the_backend_table():
    from esm_index.spectrum import COMPILED, EIGH, TORCH, TRIDIAGONAL, Backend, choose_backend

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_backend(cpu, 64, eigh_up_to=64) == Backend(EIGH, COMPILED)
    assert choose_backend(cpu, 65, eigh_up_to=64) == Backend(TRIDIAGONAL, TORCH)
    assert choose_backend(gpu, 384, eigh_up_to=64) == Backend(EIGH, TORCH)
    assert choose_backend(cpu, 384, EIGH, eigh_up_to=64) == Backend(EIGH, COMPILED)
    assert choose_backend(cpu, 8, TRIDIAGONAL, eigh_up_to=64) == Backend(TRIDIAGONAL, TORCH)
    assert choose_backend(cpu, 384, eigh_up_to=64, tridiagonal_ok=False) == Backend(EIGH, COMPILED)
    with pytest.raises(ValueError, match="unknown scoring method"):
        choose_backend(cpu, 8, "svd", eigh_up_to=64)


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
