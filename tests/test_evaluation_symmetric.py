"""symmetric_knn against a brute-force loop: exact ids and distances, ties by index."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smse_metric.evaluation import symmetric_knn


def brute(x, k, metric, groups=None):
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    dist, ids = np.zeros((n, k)), np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        rows = []
        for j in range(n):
            if j == i or (groups is not None and groups[j] == groups[i]):
                continue
            d = 1 - x[i] @ x[j] if metric == "cosine" else np.sqrt(((x[i] - x[j]) ** 2).sum())
            rows.append((d, j))
        rows.sort()
        dist[i] = [d for d, _ in rows[:k]]
        ids[i] = [j for _, j in rows[:k]]
    return dist, ids


@given(st.integers(2, 150), st.integers(1, 6), st.integers(1, 4), st.sampled_from([32, 64]),
       st.booleans(), st.integers(0, 2**16))  # fmt: skip
def test_l2_on_integer_points_is_exact_ties_included(n, k, d, block, grouped, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n, d)).astype(np.float32)  # many exact ties
    groups = rng.integers(0, max(2, n // 5), n) if grouped else None
    usable = n - 1 if groups is None else n - np.bincount(groups).max()
    k = min(k, usable)
    if k < 1:
        return
    dist, ids = symmetric_knn(x, k, "l2", groups, block=block)
    ref_d, ref_i = brute(x, k, "l2", groups)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-6, atol=1e-6)


@given(st.integers(3, 150), st.integers(1, 8), st.sampled_from([32, 96]), st.integers(0, 2**16))
def test_cosine_matches_brute_force(n, k, block, seed):
    x = np.random.default_rng(seed).standard_normal((n, 5)).astype(np.float32)
    k = min(k, n - 1)
    dist, ids = symmetric_knn(x, k, "cosine", block=block)
    ref_d, ref_i = brute(x, k, "cosine")
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, atol=1e-5)


def test_many_blocks_and_a_ragged_last_block():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    groups = rng.integers(0, 90, 1000)
    dist, ids = symmetric_knn(x, 7, "l2", groups, block=64)
    ref_d, ref_i = brute(x, 7, "l2", groups)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)
    assert not (groups[ids] == groups[:, None]).any()


def test_bad_input():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        symmetric_knn(x, 1, "dot")
    with pytest.raises(ValueError, match="k must be"):
        symmetric_knn(x, 4)
    with pytest.raises(ValueError, match="block"):
        symmetric_knn(x, 1, block=50)
