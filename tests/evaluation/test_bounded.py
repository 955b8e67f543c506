"""bounded_knn: candidates from a low-precision product within a proven error bound,
ranked in float32, equal the exact searches (ids, distances, ties by index). Off a GPU
the low-precision product is emulated; the rest is the code a GPU runs."""

import numpy as np
import pytest
import torch
from helpers import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import brute_self_neighbours

from smse_metric.evaluation import bounded, symmetric_knn
from smse_metric.evaluation._keys import factors, similarity
from smse_metric.evaluation.bounded import (
    PRECISIONS,
    bounded_knn,
    error_bound,
    low_factors,
    low_product,
)
from smse_metric.functional import DISTANCES


def _local_pairs(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered rows in dataset order with a near twin each (a patient's images side by
    side), and groups of 10 consecutive rows."""
    rng = np.random.default_rng(seed)
    y = np.sort(rng.integers(0, 5, n))
    x = (rng.standard_normal((n, d)) + y[:, None] * 0.3).astype(np.float32)
    x[1::2] = x[::2] + np.float32(0.05) * rng.standard_normal((n // 2, d)).astype(np.float32)
    return x, np.repeat(np.arange(n // 10 + 1), 10)[:n]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("grouped", [False, True])
def test_equals_the_symmetric_search_bit_for_bit(precision, distance, grouped):
    """Several blocks and chunks (ragged last ones), so that the bar rises across chunks
    and candidates from early chunks are dropped again; ids and distances must be the
    float32 search's exactly, not within a tolerance."""
    x, groups = _local_pairs(3000, 24, 1)
    groups = groups if grouped else None
    want = symmetric_knn(x, 9, distance, groups)
    got = bounded_knn(x, 9, distance, groups, precision=precision, block=320, chunk=704)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_the_data_needs_the_bound(monkeypatch):
    """The comparison above can fail: with the bound taken away (or a tenth of it for
    bf16 on these rows) the low-precision product misses neighbours."""
    x, _ = _local_pairs(3000, 24, 1)
    want = symmetric_knn(x, 9, "l2")[1]
    monkeypatch.setattr(bounded, "error_bound", lambda dim, precision: (0.0, 0.0))
    for precision in PRECISIONS:
        got = bounded_knn(x, 9, "l2", precision=precision, block=320, chunk=704)[1]
        assert (got != want).any(1).sum() > 10


@given(
    st.integers(2, 120),
    st.integers(1, 6),
    st.integers(1, 4),
    st.sampled_from([(32, 32), (64, 96)]),
    st.booleans(),
    st.sampled_from(PRECISIONS),
    st.integers(0, 2**16),
)
@settings(deadline=None)
def test_integer_points_are_exact_ties_included(n, k, d, sizes, grouped, precision, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n, d)).astype(np.float32)  # many exact ties
    groups = rng.integers(0, max(2, n // 5), n) if grouped else None
    usable = n - 1 if groups is None else n - np.bincount(groups).max()
    k = min(k, usable)
    if k < 1:
        return
    block, chunk = sizes
    dist, ids = bounded_knn(x, k, "l2", groups, precision=precision, block=block, chunk=chunk)
    ref_d, ref_i = brute_self_neighbours(x, k, "l2", groups)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-6, atol=1e-6)


def test_rows_with_fewer_others_than_k_get_empty_slots():
    x = np.arange(8, dtype=np.float32)[:, None]
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # group 1's rows have 3 others
    dist, ids = bounded_knn(x, 4, "l2", groups)
    assert ids[:3].tolist() == [[3, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6]]
    assert ids[3:, :3].tolist() == [[2, 1, 0]] * 5 and (ids[3:, 3] == -1).all()
    assert np.isinf(dist[3:, 3]).all() and dist[7].tolist()[:3] == [5.0, 6.0, 7.0]


@pytest.mark.parametrize("case", ["all equal", "10 distinct rows", "2-D zeros"])
@pytest.mark.parametrize("crowded", [False, True])
def test_collapsed_embeddings_are_ties_by_index(case, crowded, monkeypatch):
    """Every similarity ties: the bound keeps every entry, so blocks go to the float32
    search (``crowded``: a small CAP) or rank them all; both exact, ties by index."""
    rng = np.random.default_rng(2)
    x = {
        "all equal": np.ones((400, 8)),
        "10 distinct rows": np.repeat(rng.integers(-3, 4, (10, 8)), 40, 0),
        "2-D zeros": np.zeros((400, 2)),
    }[case].astype(np.float32)
    groups = rng.integers(0, 40, 400)
    monkeypatch.setattr(bounded, "CAP", 4 if crowded else 10**6)
    calls = []
    real = bounded._Block.exact
    monkeypatch.setattr(bounded._Block, "exact", lambda self: calls.append(1) or real(self))
    for distance in ("l2", "squared_l2") if case == "2-D zeros" else DISTANCES:
        for g in (None, groups):
            dist, ids = bounded_knn(x, 5, distance, g, precision="bf16", block=64, chunk=128)
            ref_d, ref_i = brute_self_neighbours(x, 5, distance, g)
            np.testing.assert_array_equal(ids, ref_i)
            np.testing.assert_allclose(dist, ref_d, atol=1e-6)
    assert bool(calls) == crowded


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_the_bound_holds_and_is_nearly_tight(precision, distance):
    """|low-precision value - (float32 similarity + the row's shift)| stays within
    error_bound on random rows of several scales, and for L2 on rows built to round
    every input the same way it comes within 10 % of it (bf16; TF32: 55 %, see below)."""
    rng = np.random.default_rng(4)
    d = 64
    # every input just above 1 + u: rounds up by almost u, all in the same direction
    u = {"tf32": 2.0**-11, "bf16": 2.0**-8}[precision]  # half the spacing at 1
    worst = np.full((32, d), 1 + u + u / 64, dtype=np.float32)
    scales = [rng.standard_normal((96, d)).astype(np.float32) * s for s in (1e-3, 1, 30)]
    a, b = error_bound(d, precision)
    ratios = []
    for x in [worst, *scales]:
        f = factors(torch.from_numpy(x), distance).padded()
        low_q, low_g = low_factors(f, precision)
        low = low_product(low_q, low_g, precision)[: len(x), : len(x)].double()
        exact = similarity(f, f, len(x)).double()
        shift = 0.0 if f.h is None else f.h[: len(x), None].double()
        norms = f.x[: len(x)].double().norm(dim=1)
        bound = a * norms[:, None] * norms[None, :]
        if f.h is not None:
            h = f.h[: len(x)].double()
            bound = bound + b * (h[:, None] + h[None, :])
        ratios.append(float(((low - (exact + shift)).abs() / bound).max()))
    assert max(ratios) <= 1.0
    if distance == "l2":  # normalised, the worst rows are powers of two: nothing rounds
        # TF32's bound allows a truncating conversion, twice the emulated rounding's error
        assert ratios[0] > (0.45 if precision == "tf32" else 0.9)


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_tensor_is_searched_there_with_the_cpu_neighbours(device):
    """Integer points: every product is exact in float32 (and the low-precision formats
    hold them), so the device's ids and distances equal the CPU's float32 search."""
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, (900, 4)).astype(np.float32)
    groups = rng.integers(0, 70, 900)
    want = symmetric_knn(x, 6, "l2", groups)
    for precision in PRECISIONS:
        got = bounded_knn(torch.from_numpy(x).to(device), 6, "l2", groups, precision=precision)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


@pytest.fixture
def matmul_settings():
    """torch's TF32 settings (global state) as they were before the test."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.fp32_precision, matmul.fp32_precision
    yield matmul
    torch.backends.fp32_precision, matmul.fp32_precision = saved


@pytest.mark.parametrize(
    ("caller", "theirs"),
    [
        ("torch.set_float32_matmul_precision('highest')", "torch.get_float32_matmul_precision()"),
        ("torch.set_float32_matmul_precision('high')", "torch.get_float32_matmul_precision()"),
        ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "matmul.fp32_precision"),
        ("torch.backends.fp32_precision = 'tf32'", "matmul.fp32_precision"),
    ],
)
def test_the_tf32_switch_leaves_the_callers_setting(matmul_settings, caller, theirs):
    """The GPU's TF32 products are switched on around the block and the caller's
    setting comes back, whichever of torch's APIs the caller used: after the newer
    per-backend one, torch's global getter raises, so the switch must not use it."""
    matmul = matmul_settings
    exec(caller)
    before = eval(theirs)
    with bounded._tf32():
        assert matmul.fp32_precision == "tf32"
    assert eval(theirs) == before


def test_bad_input():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="precision"):
        bounded_knn(x, 1, precision="fp8")
    with pytest.raises(ValueError, match="k must be"):
        bounded_knn(x, 4)
    with pytest.raises(ValueError, match="chunk"):
        bounded_knn(x, 1, chunk=50)
    with pytest.raises(ValueError, match="block"):
        bounded_knn(x, 1, block=0)
    with pytest.raises(ValueError, match="groups"):
        bounded_knn(x, 1, groups=np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        bounded_knn(np.zeros(4, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="precision"):
        error_bound(8, "float32")


@pytest.mark.parametrize(
    ("free_gib", "want"),
    [(70, (8192, 65536)), (8, (4096, 32768)), (2, (2048, 16384)), (0, (1024, 8192))],
)
def test_the_gpu_sizes_follow_the_free_memory(monkeypatch, free_gib, want):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (free_gib * 2**30, 80 * 2**30))
    assert bounded._sizes(torch.device("cuda")) == want
    assert bounded._sizes(torch.device("cpu")) == bounded.CPU_SIZES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["auto", "float32", *PRECISIONS])
def test_knn_classifier_takes_the_precision_asked_for(device, precision, monkeypatch):
    """KNNClassifier's leave-one-out search of its own gallery: ``"auto"`` is TF32
    candidates on a GPU and the float32 symmetric search elsewhere; every choice gives
    the same neighbours."""
    from smse_metric import KNNClassifier
    from smse_metric.evaluation import knn as ev

    monkeypatch.setattr(ev, "SYMMETRIC_MIN_ROWS", 100)
    calls = []
    for name in ("symmetric_knn", "bounded_knn"):
        real = getattr(ev, name)
        monkeypatch.setattr(
            ev,
            name,
            lambda *a, real=real, name=name, **kw: calls.append((name, kw)) or real(*a, **kw),
        )
    rng = np.random.default_rng(3)  # integer points: every device and format is exact
    x, groups = rng.integers(-3, 4, (600, 8)).astype(np.float32), rng.integers(0, 60, 600)
    xt = torch.from_numpy(x).to(device)
    knn = KNNClassifier(k=5, distance="l2", backend="torch", precision=precision)
    knn.fit(xt, groups % 3, groups)
    ids = np.concatenate([c.ids for c in knn.kneighbors_chunks(xt, groups, "group")])
    want = {"auto": "tf32" if device == "cuda" else "float32"}.get(precision, precision)
    name, kw = calls[0]
    assert name == ("symmetric_knn" if want == "float32" else "bounded_knn")
    assert kw.get("precision", "float32") == want and str(kw["device"]) == device
    np.testing.assert_array_equal(ids, symmetric_knn(x, 5, "l2", groups)[1])
    with pytest.raises(ValueError, match="precision"):
        KNNClassifier(precision="fp16")
