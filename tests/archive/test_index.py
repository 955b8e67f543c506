"""ArchiveIndex and exact_search: a brute-force loop as reference, recall measured and
kept, persistence, appends, removed rows and models never mixed."""

import importlib.util

import numpy as np
import pytest
import torch
from helpers import DEVICES, needs_faiss
from hypothesis import given, settings
from hypothesis import strategies as st

from smse_metric.archive import KINDS, ArchiveIndex, EmbeddingStore, exact_search

APPROX = [pytest.param(k, marks=needs_faiss) for k in KINDS if k != "exact"]
ALL = ["exact", *APPROX]


def clustered(n, dim=16, centres=50, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)).astype(np.float32) * 4
    y = rng.integers(0, centres, n)
    return (c[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def make_store(tmp_path, x, name="a", cases=None):
    s = EmbeddingStore.create(tmp_path / name, dim=x.shape[1], model="net@1", dtype="float32")
    cases = np.arange(len(x)) // 4 if cases is None else cases
    s.add(x, cases=cases, sources=[f"img{i}.png" for i in range(len(x))])
    return s


def brute(x, live, q, k, distance):
    """Plain loops: each query's k nearest allowed rows, ties by row, and every row's
    distance (float64)."""
    out, table = [], []
    for v in q:
        scored = []
        for i, g in enumerate(x):
            if not live[i]:
                continue
            if distance == "cosine":
                a, b = v / (np.linalg.norm(v) or 1), g / (np.linalg.norm(g) or 1)
                d = 1 - float(np.dot(a.astype(np.float64), b.astype(np.float64)))
            else:
                d = float(np.sqrt(((v.astype(np.float64) - g) ** 2).sum()))
            scored.append((d, i))
        table.append(dict((i, d) for d, i in scored))
        scored.sort()
        out.append([i for _, i in scored[:k]] + [-1] * (k - len(scored[:k])))
    return np.array(out), table


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 8),
    grid=st.booleans(),
    distance=st.sampled_from(["l2", "cosine"]),
    seed=st.integers(0, 1000),
)
def test_exact_search_is_the_brute_force_loop(tmp_path_factory, device, n, k, grid, distance, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    if grid:  # integer grid: many exact ties, broken by row
        x = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)
    s = make_store(tmp_path_factory.mktemp("s"), x)
    live = rng.random(n) > 0.3
    q = x[: min(n, 5)] + (0 if grid else 0.01)
    d, ids = exact_search(s, q, k, distance, allowed=live, chunk=7, device=device)
    want, table = brute(x, live, q, k, distance)
    if grid and distance == "l2":  # integer squared distances: ties exact, by row
        assert np.array_equal(ids, want)
    assert np.array_equal(ids < 0, want < 0)
    for row, t, got, dist in zip(want, table, ids, d, strict=True):  # the k best distances
        best = [t[i] for i in row if i >= 0]
        np.testing.assert_allclose([t[i] for i in got if i >= 0], best, atol=1e-5)
        np.testing.assert_allclose(dist[got >= 0], best, atol=1e-5)
        assert np.isinf(dist[got < 0]).all()


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_recall_is_measured_kept_and_holds_on_new_probes(tmp_path, kind, distance):
    x, _ = clustered(6000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, kind, distance=distance, recall=0.9, k=10, probes=400,
                               pq_bytes=4)  # fmt: skip
    info = index.build_info
    assert info.recall >= 0.9 and info.curve[-1][1] == info.recall
    assert info.kind == kind and info.rows == 6000
    fresh = index.measure_recall(probes=400, seed=7)
    assert abs(fresh - info.recall) <= 0.02, (fresh, info.recall)
    if kind != "exact":  # the cheapest setting: the one before it missed the target
        assert len(info.curve) == 1 or info.curve[-2][1] < 0.9


@pytest.mark.parametrize("kind", APPROX)
def test_an_unreachable_target_keeps_the_best_setting_and_says_so(tmp_path, kind):
    x, _ = clustered(3000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, kind, recall=1.0, probes=200, pq_bytes=2, nlist=30)
    info = index.build_info
    best = max(r for _, r in info.curve)
    assert info.recall == best
    if info.recall < 1.0:
        assert info.target == 1.0 and len(info.curve) > 1


@needs_faiss
def test_ivf_pq_reranks_its_shortlist_with_exact_distances(tmp_path):
    x, _ = clustered(4000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, "ivf_pq", recall=0.9, probes=200, pq_bytes=4)
    q = x[:20] + 0.05
    d, ids = index.search(q, 5)
    direct = np.sqrt(((x[ids].astype(np.float64) - q[:, None, :]) ** 2).sum(2))
    np.testing.assert_allclose(d, direct, rtol=1e-5)  # float32 direct differences
    assert (np.diff(d, axis=1) >= 0).all()
    assert index.nbytes() < x.nbytes / 3  # codes (and small codebooks), not vectors


@pytest.mark.parametrize("kind", ALL)
def test_saved_indexes_reload_and_answer_alike(tmp_path, kind):
    x, _ = clustered(3000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, kind, recall=0.9, probes=200, pq_bytes=4)
    index.save(tmp_path / "idx")
    again = ArchiveIndex.load(EmbeddingStore(tmp_path / "a"), tmp_path / "idx")
    assert again.build_info == index.build_info
    q = x[:30] + 0.1
    assert np.array_equal(again.search(q, 7)[1], index.search(q, 7)[1])


@pytest.mark.parametrize("kind", ALL)
def test_appended_rows_are_found_after_add_new(tmp_path, kind):
    x, _ = clustered(3000)
    s = make_store(tmp_path, x[:2500])
    index = ArchiveIndex.build(s, kind, recall=0.9, probes=200, pq_bytes=4)
    s.add(x[2500:], cases=np.arange(500) + 10_000, sources=[f"new{i}" for i in range(500)])
    assert index.pending == 500
    assert index.add_new(chunk=128) == 500 and index.pending == 0
    _, ids = index.search(x[2500:2600], 1)
    assert (ids[:, 0] == np.arange(2500, 2600)).mean() >= 0.95  # each finds itself
    assert not index.rebuild_due


@pytest.mark.parametrize("kind", ALL)
def test_removed_and_disallowed_rows_are_never_returned(tmp_path, kind):
    x, _ = clustered(2000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, kind, recall=0.9, probes=200, pq_bytes=4)
    s.remove_case(0)  # rows 0-3
    s.remove_case(5)
    _, ids = index.search(x[:24], 10)
    assert not np.isin(ids, [0, 1, 2, 3, 20, 21, 22, 23]).any()
    allowed = np.arange(len(x)) % 2 == 0
    _, ids = index.search(x[:24], 10, allowed)
    assert (ids[ids >= 0] % 2 == 0).all()
    assert (ids >= 0).all()


@needs_faiss
def test_rebuild_is_due_once_the_store_outgrows_the_training_sample(tmp_path):
    x, _ = clustered(3000)
    s = make_store(tmp_path, x[:200])
    index = ArchiveIndex.build(s, "ivf_flat", recall=0.5, probes=50, nlist=2)
    assert index.build_info.trained_rows == 128  # 64 points per cell
    assert not index.rebuild_due
    s.add(x[200:], cases=np.arange(2800) + 10_000, sources=[f"n{i}" for i in range(2800)])
    index.add_new()
    assert index.rebuild_due


def test_an_index_of_another_model_or_a_shorter_archive_is_refused(tmp_path):
    x, _ = clustered(300)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, "exact", probes=20)
    index.save(tmp_path / "idx")
    other = EmbeddingStore.create(tmp_path / "b", dim=16, model="other@9", dtype="float32")
    other.add(x, cases=np.arange(300), sources=np.arange(300))
    with pytest.raises(ValueError, match=r"built over vectors of 'net@1'.*'other@9'"):
        ArchiveIndex.load(other, tmp_path / "idx")
    short = make_store(tmp_path, x[:10], name="c")
    with pytest.raises(ValueError, match="indexes 300 rows, the archive has 10"):
        ArchiveIndex.load(short, tmp_path / "idx")
    with pytest.raises(ValueError, match="no archive index at"):
        ArchiveIndex.load(s, tmp_path / "nothing")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "lsh"}, "kind must be one of"),
        ({"recall": 1.5}, r"recall must be in \(0, 1\]"),
        ({"k": 0}, "k must be a positive integer"),
        ({"distance": "squared_l2"}, "distance must be one of"),
    ],
)
def test_bad_build_arguments_name_themselves(tmp_path, kwargs, message):
    x, _ = clustered(100)
    s = make_store(tmp_path, x)
    kind = kwargs.pop("kind", "exact")
    with pytest.raises(ValueError, match=message):
        ArchiveIndex.build(s, kind, **kwargs)


@needs_faiss
def test_faiss_torch_utils_imported_elsewhere_does_not_break_filtered_search(tmp_path):
    """faiss.contrib.torch_utils (which users and PML import) swaps every index's
    `search` for one without `params`: the archive still filters and tunes."""
    import faiss.contrib.torch_utils  # noqa: F401

    x, _ = clustered(1000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, "ivf_flat", recall=0.9, probes=100)
    allowed = np.arange(1000) >= 500
    _, ids = index.search(x[:5], 3, allowed)
    assert (ids >= 500).all()


@pytest.mark.parametrize("device", DEVICES)
def test_exact_searches_run_on_the_device_asked_for(tmp_path, device):
    """The exact kind's search, its recall reference and leave-one-case-out evaluation
    on ``device`` give the CPU's answers (one query block per chunk row on a GPU)."""
    from smse_metric.archive import evaluate_cases

    x, centre = clustered(300)
    s = EmbeddingStore.create(tmp_path / "a", dim=x.shape[1], model="net@1", dtype="float32")
    cases = np.arange(300) // 4
    s.add(x, cases=cases, sources=[f"i{i}.png" for i in range(300)], labels=centre[cases * 4] % 2)
    on_cpu, here = (ArchiveIndex.build(s, "exact", device=dev) for dev in ("cpu", device))
    assert here.device == device
    q = x[:40] + 0.01
    for a, b in zip(on_cpu.search(q, 5), here.search(q, 5), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert evaluate_cases(here, k=5, per_case=2) == evaluate_cases(on_cpu, k=5, per_case=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without GPU")
def test_a_gpu_this_machine_lacks_is_refused_in_one_line(tmp_path):
    s = make_store(tmp_path, clustered(20)[0])
    with pytest.raises(ValueError, match=r"^device='cuda': no CUDA device is available here"):
        ArchiveIndex.build(s, "exact", device="cuda")


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
@pytest.mark.parametrize("gpu_k", [2048, 16])
def test_the_gpu_copys_post_filter_answers_as_the_selector(tmp_path, monkeypatch, kind, gpu_k):
    """FAISS's GPU IVF takes no ID selector: its copy fetches more and drops what the
    filter refuses, and hands the queries it cannot fill (its k limit, cells run out) to
    the CPU search with the selector. Played here by a CPU clone in the GPU copy's
    place: every filter gives the selector's rows, in its order."""
    import faiss

    from smse_metric.archive import index as archive_index

    x, _ = clustered(3000)
    s = make_store(tmp_path, x)
    index = ArchiveIndex.build(s, kind, recall=0.9, probes=200, pq_bytes=4)
    s.remove_case(3)
    masks = [None, np.arange(3000) % 3 == 0, np.arange(3000) >= 2950, s.case != s.case[7]]
    want = [index.search(x[:50], 10, m) for m in masks]
    clones = []
    monkeypatch.setattr(archive_index, "GPU_K", gpu_k)
    monkeypatch.setattr(ArchiveIndex, "on_gpu", property(lambda self: True))
    monkeypatch.setattr(
        ArchiveIndex, "_to_gpu", staticmethod(lambda f, i: clones.append(1) or faiss.clone_index(i))
    )
    for m, (d, ids) in zip(masks, want, strict=True):
        got_d, got = index.search(x[:50], 10, m)
        assert np.array_equal(got, ids) and np.array_equal(got_d, d)
    assert clones == [1]  # one copy, kept
    s.add(x[:5] + 0.001, cases=[999] * 5, sources=[f"new{i}" for i in range(5)])
    index.add_new()
    assert set(index.search(x[:5], 3)[1].ravel()) & {3000, 3001, 3002, 3003, 3004}
    assert clones == [1, 1]  # copied again with the new rows


def _faiss_gpus() -> int:
    from smse_metric.evaluation.index import faiss_gpu_count

    return faiss_gpu_count() if importlib.util.find_spec("faiss") else 0


@pytest.mark.cuda
@pytest.mark.skipif(_faiss_gpus() == 0, reason="needs a faiss with GPUs (the [faiss-gpu] extra)")
def test_an_ivf_index_searches_on_the_gpu_where_faiss_has_gpus(tmp_path):
    x, _ = clustered(3000)
    s = make_store(tmp_path, x)
    cpu = ArchiveIndex.build(s, "ivf_flat", recall=0.9, probes=200)
    gpu = ArchiveIndex.build(s, "ivf_flat", recall=0.9, probes=200, device="cuda")
    assert gpu.on_gpu and not cpu.on_gpu
    for mask in (None, s.case != s.case[7]):
        _, want = cpu.search(x[:50], 10, mask)
        _, got = gpu.search(x[:50], 10, mask)
        assert (got == want).mean() > 0.99  # GPU distances may round ties apart
