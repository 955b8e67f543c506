"""symmetric_knn against a brute-force loop and against the index search: exact ids and
distances, ties by index."""

import numpy as np
import pytest
import torch
from helpers import BACKENDS, DEVICES
from hypothesis import example, given
from hypothesis import strategies as st
from reference import brute_self_neighbours

from smse_metric import (
    KNNClassifier,
    evaluate_embeddings,
)
from smse_metric.evaluation import knn as ev
from smse_metric.evaluation import symmetric, symmetric_knn
from smse_metric.functional import DISTANCES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["cosine", "l2", "squared_l2"])
@pytest.mark.parametrize("exclude", ["self", "group"])
def test_symmetric_leave_one_out_equals_the_index_search(monkeypatch, distance, exclude, backend):
    rng = np.random.default_rng(3)
    n = 5000  # above SYMMETRIC_MIN_ROWS and over several 2048-row blocks
    y = rng.integers(0, 5, n)
    x = (rng.standard_normal((n, 16)) + y[:, None] * 0.3).astype(np.float32)
    g, s = rng.integers(0, 300, n), rng.integers(0, 4, n)

    def run():
        knn = KNNClassifier(k=7, distance=distance, backend=backend).fit(x, y, g)
        chunks = list(knn.kneighbors_chunks(x, g, exclude))
        report = evaluate_embeddings(
            x, y, g, s, k=7, exclude=exclude, distance=distance, ranking=False, backend=backend
        )
        return np.concatenate([c.ids for c in chunks]), report.to_dict()

    calls = []
    real = ev.symmetric_knn
    monkeypatch.setattr(ev, "symmetric_knn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast_ids, fast = run()
    assert calls  # the symmetric search answered
    monkeypatch.setattr(ev, "SYMMETRIC_MIN_ROWS", 10**9)
    slow_ids, slow = run()
    np.testing.assert_array_equal(fast_ids, slow_ids)
    assert fast == slow


@given(
    st.integers(2, 150),
    st.integers(1, 6),
    st.integers(1, 4),
    st.sampled_from([32, 64]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_l2_on_integer_points_is_exact_ties_included(n, k, d, block, grouped, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n, d)).astype(np.float32)  # many exact ties
    groups = rng.integers(0, max(2, n // 5), n) if grouped else None
    usable = n - 1 if groups is None else n - np.bincount(groups).max()
    k = min(k, usable)
    if k < 1:
        return
    dist, ids = symmetric_knn(x, k, "l2", groups, block=block)
    ref_d, ref_i = brute_self_neighbours(x, k, "l2", groups)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-6, atol=1e-6)


@given(st.integers(3, 150), st.integers(1, 8), st.sampled_from([32, 96]), st.integers(0, 2**16))
@example(62, 4, 32, 899)  # a float32 near tie
def test_cosine_matches_brute_force(n, k, block, seed):
    x = np.random.default_rng(seed).standard_normal((n, 5)).astype(np.float32)
    k = min(k, n - 1)
    dist, ids = symmetric_knn(x, k, "cosine", block=block)
    ref_d, ref_i = brute_self_neighbours(x, k, "cosine")
    # float32 search, float64 reference: two neighbours whose float64 distances differ
    # by less than float32 rounding may swap (seed 899, n = 62: 0.15649188 apart by
    # 1e-8); every other id must be the reference's
    unit = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    swapped = np.argwhere(ids != ref_i)
    for row, rank in swapped:
        mine = 1 - unit[row] @ unit[ids[row, rank]]
        assert abs(mine - ref_d[row, rank]) < 1e-6, (row, rank)
    assert len(swapped) <= 2 * max(1, n // 50)
    np.testing.assert_allclose(dist, ref_d, atol=1e-5)


def test_many_blocks_and_a_ragged_last_block():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    groups = rng.integers(0, 90, 1000)
    dist, ids = symmetric_knn(x, 7, "l2", groups, block=64)
    ref_d, ref_i = brute_self_neighbours(x, 7, "l2", groups)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)
    assert not (groups[ids] == groups[:, None]).any()


def test_bad_input():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="distance"):
        symmetric_knn(x, 1, "dot")
    with pytest.raises(ValueError, match="k must be"):
        symmetric_knn(x, 4)
    with pytest.raises(ValueError, match="block"):
        symmetric_knn(x, 1, block=50)


@pytest.mark.parametrize("case", ["all equal", "10 distinct rows", "2-D zeros"])
@pytest.mark.parametrize("grouped", [False, True])
def test_collapsed_embeddings_are_exact_ties_by_index(case, grouped):
    """Collapsed embeddings, normal early in training: every similarity ties, so only
    the index decides; groups permute the rows internally (ids then arrive out of
    order), and several blocks make the early blocks beat later queries' picks; with
    block = 128 and k = 2 a query sees more candidate tiles than k, the direct top-k
    path. Small integers keep float32 exact, so the distances must equal too."""
    rng = np.random.default_rng(2)
    distinct = rng.integers(-3, 4, (10, 8))
    x = {
        "all equal": np.ones((700, 8)),
        "10 distinct rows": np.repeat(distinct, 70, 0),
        "2-D zeros": np.zeros((700, 2)),
    }[case].astype(np.float32)
    groups = rng.integers(0, 60, 700) if grouped else None
    for distance in ("l2", "squared_l2") if case == "2-D zeros" else DISTANCES:  # cosine of 0: none
        for k, block in ((5, 64), (2, 128)):
            dist, ids = symmetric_knn(x, k, distance, groups, block=block)
            ref_d, ref_i = brute_self_neighbours(x, k, distance, groups)
            np.testing.assert_array_equal(ids, ref_i)
            np.testing.assert_allclose(dist, ref_d, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_the_search_runs_where_the_embeddings_are_with_the_same_neighbours(device, monkeypatch):
    """symmetric_knn on torch tensors of a device, and KNNClassifier's torch backend
    on them, give the CPU's neighbours exactly (integer points: ties everywhere)."""
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, (600, 4)).astype(np.float32)
    groups = rng.integers(0, 50, 600)
    want = symmetric_knn(x, 6, "l2", groups, block=128)
    got = symmetric_knn(torch.from_numpy(x).to(device), 6, "l2", groups, block=128)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    calls = []
    real = ev.symmetric_knn
    monkeypatch.setattr(ev, "symmetric_knn", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(ev, "SYMMETRIC_MIN_ROWS", 100)
    xt = torch.from_numpy(x).to(device)
    knn = KNNClassifier(k=6, distance="l2", backend="torch").fit(xt, groups % 3, groups)
    ids = np.concatenate([c.ids for c in knn.kneighbors_chunks(xt, groups, "group")])
    assert calls and str(calls[0]["device"]) == device  # the symmetric search, on the device
    np.testing.assert_array_equal(ids, brute_self_neighbours(x, 6, "l2", groups)[1])


@pytest.mark.parametrize(
    ("free_gib", "n", "want"),
    [
        (70, 10**6, 32768),  # an 80 GB card: 4 x 4 GiB blocks fit in half its free memory
        (20, 10**6, 16384),
        (1, 10**6, 4096),
        (0, 10**6, symmetric.BLOCK),  # nothing fits: the CPU's block
        (70, 20_000, 16384),  # never a block beyond the rows
        (70, 100, symmetric.BLOCK),
    ],
)
def test_the_gpu_block_is_the_largest_that_fits(monkeypatch, free_gib, n, want):
    """The default block on a GPU follows its free memory and the rows (no GPU needed:
    the memory query is replaced); on the CPU it is BLOCK."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (free_gib * 2**30, 80 * 2**30))
    assert symmetric.default_block(torch.device("cuda"), n) == want
    assert symmetric.default_block(torch.device("cpu"), n) == symmetric.BLOCK
