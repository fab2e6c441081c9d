"""``cmdtool/report/metrics.py`` on small arrays: the streaming pass against dense numpy, the Gram-matrix
PCA against a dense SVD, and the weight-averaging coefficients against their recursions."""

from __future__ import annotations

import numpy as np
import pytest

from cmdtool.report import metrics


def tiles(W: np.ndarray, width: int):
    for start in range(0, W.shape[1], width):
        yield start, min(start + width, W.shape[1]), W[:, start:start + width]


@pytest.fixture
def small():
    """T = 7 checkpoints of N = 23 parameters in 3 tensors (sizes 5, 10, 8), M = 2 normalised
    references, float32 a, b as a mode file stores them; column 4 is constant."""
    rng = np.random.default_rng(3)
    T, N, M = 7, 23, 2
    raw = rng.normal(size=(M, T))
    centred = raw - raw.mean(axis=1, keepdims=True)
    references = (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, M, size=N).astype(np.uint8)
    a = rng.normal(size=N).astype(np.float32)
    b = rng.normal(size=N).astype(np.float32)
    W = (a * references[labels].T.astype(np.float64) + b + 0.05 * rng.normal(size=(T, N))).astype(np.float32)
    W[:, 4] = 1.5
    tensor_of_column = np.repeat([0, 1, 2], [5, 10, 8])
    return W, references, labels, a, b, tensor_of_column


@pytest.mark.parametrize("width", [1, 4, 23, 100])
def test_measure_equals_dense_numpy_for_any_tiling(small, width):
    W, references, labels, a, b, tensor_of_column = small
    T, N = W.shape
    advanced = []
    measured = metrics.measure(tiles(W, width), lambda start, stop: (labels[start:stop], a[start:stop], b[start:stop]),
                               references, tensor_of_column, 3, advanced.append)
    assert sum(advanced) == N

    X = W.astype(np.float64)
    error = X - (a.astype(np.float64) * references.astype(np.float64)[labels].T + b.astype(np.float64))
    displacement = X - X[0]
    for name, values in (("error_sq", error), ("norm_sq", X), ("displacement_sq", displacement)):
        np.testing.assert_allclose(getattr(measured, name), (values ** 2).sum(axis=1), rtol=1e-12)
        per_tensor = [(values[:, tensor_of_column == j] ** 2).sum() for j in range(3)]
        last = [(values[-1, tensor_of_column == j] ** 2).sum() for j in range(3)]
        np.testing.assert_allclose(getattr(measured, f"tensor_{name}"), per_tensor, rtol=1e-12)
        np.testing.assert_allclose(getattr(measured, f"tensor_{name}_last"), last, rtol=1e-12)
    assert measured.displacement_sq[0] == 0

    counts = [[np.sum((labels == m) & (tensor_of_column == j)) for j in range(3)] for m in range(2)]
    np.testing.assert_array_equal(measured.mode_layer_counts, counts)
    for m in range(2):
        members = [i for i in np.flatnonzero(labels == m) if i != 4]  # the constant column has no correlation
        corr = [abs(np.corrcoef(X[:, i], references[m].astype(np.float64))[0, 1]) for i in members]
        assert measured.mode_varying[m] == len(members)
        assert measured.mode_abs_corr_sum[m] == pytest.approx(sum(corr), rel=1e-6)

    centred = X - X.mean(axis=0)
    np.testing.assert_allclose(measured.gram, centred @ centred.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_pca_from_gram_equals_dense_svd(seed):
    rng = np.random.default_rng(seed)
    T, N = 9, 40
    W = np.cumsum(rng.normal(size=(T, N)), axis=0)
    mean = W.mean(axis=0)
    U, S, Vt = np.linalg.svd(W - mean, full_matrices=False)
    pca = metrics.pca_from_gram((W - mean) @ (W - mean).T)

    np.testing.assert_allclose(pca.eigenvalues, np.concatenate([S ** 2, np.zeros(T - len(S))]), rtol=1e-9, atol=1e-9)
    for d in range(0, T):
        approximation = mean + U[:, :d] * S[:d] @ Vt[:d]
        np.testing.assert_allclose(pca.error_sq(d), ((W - approximation) ** 2).sum(axis=1), rtol=1e-8, atol=1e-9)
        for t in (0, T // 2, T - 1):
            np.testing.assert_allclose(pca.weights_at(d, t) @ W, approximation[t], rtol=1e-9, atol=1e-9)
    # All directions: the centred trajectory has rank T - 1, so d = T - 1 reproduces every checkpoint.
    np.testing.assert_allclose(pca.error_sq(T - 1), 0, atol=1e-9)


def test_tail_weights():
    np.testing.assert_array_equal(metrics.tail_weights(6, 2), [0, 0, 0, 0, 0.5, 0.5])
    np.testing.assert_array_equal(metrics.tail_weights(4, 10), [0.25] * 4)  # k > T: all checkpoints
    np.testing.assert_array_equal(metrics.tail_weights(4, 1), metrics.unit_weights(4, 3))


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99])
def test_ema_weights_equal_the_recursion(decay):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(8, 5))
    ema = W[0].copy()
    for t in range(1, 8):
        ema = decay * ema + (1 - decay) * W[t]
    c = metrics.ema_weights(8, decay)
    assert c.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(c @ W, ema, rtol=1e-12)


def test_ratio_and_storage():
    np.testing.assert_array_equal(metrics.ratio([4.0, 0.0, 9.0], [16.0, 0.0, 1.0]), [0.5, 0.0, 3.0])
    assert not np.isfinite(metrics.ratio(1.0, 0.0))  # report.json writes it as null
    assert metrics.pca_storage_floats(2, N=100, T=7) == 3 * 100 + 2 * 7


@pytest.mark.parametrize("width", [1, 5, 23])
def test_skipping_constant_columns_equals_the_full_pass(small, width, monkeypatch):
    """``varies`` skips constant columns whose ``a`` is 0 (their sums are formed from the first row);
    the sums equal the full pass's to 1e-12 (rounding: other summation orders), the counts exactly.
    Constant columns: a run straddling two tensors (b their value), one whose ``b`` is off (its
    error is not 0), one of ±0 with ``b = -0``, and one with ``a ≠ 0`` (computed, not skipped)."""
    W, references, labels, a, b, tensor_of_column = small
    W, a, b = W.copy(), a.copy(), b.copy()
    W[:, 12:17] = W[0, 12:17]
    a[12:17], b[12:17] = 0.0, W[0, 12:17]
    a[4], b[4] = 0.0, 1.75
    W[:, 20], a[20], b[20] = 0.0, 0.0, -0.0
    W[::2, 20] = -0.0
    W[:, 8] = W[0, 8]  # constant, but a ≠ 0: computed
    varies = (W != W[0]).any(axis=0)
    assert not varies[[4, 8, 12, 13, 14, 15, 16, 20]].any() and a[8] != 0
    monkeypatch.setattr(metrics, "MERGE_COLUMNS", 1)  # every run of constant columns is skipped, however short
    parameters = lambda start, stop: (labels[start:stop], a[start:stop], b[start:stop])  # noqa: E731
    full = metrics.measure(tiles(W, width), parameters, references, tensor_of_column, 3)
    unread = W.copy()
    unread[1:, ~varies & (a == 0)] = np.nan  # the skipping pass reads only the first row of what it skips
    skipping = metrics.measure(tiles(unread, width), parameters, references, tensor_of_column, 3, varies=varies)
    for name, whole, skipped in zip(full._fields, full, skipping):
        if np.asarray(whole).dtype.kind == "i":
            np.testing.assert_array_equal(skipped, whole, err_msg=name)
        else:
            np.testing.assert_allclose(skipped, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max(), err_msg=name)
    assert skipping.error_sq.min() > 0 and skipping.displacement_sq[0] == 0
