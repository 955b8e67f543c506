"""Evaluation: kNN against brute force, sklearn and PML; metrics against hand computation."""

import numpy as np
import pytest
import torch
from conftest import BACKENDS, DEVICES, needs_faiss, needs_pml
from hypothesis import given
from hypothesis import strategies as st

from smse_metric import (
    FaissIndex,
    KNNClassifier,
    TorchIndex,
    evaluate_embeddings,
    evaluate_predictions,
    make_index,
)
from smse_metric.evaluation import knn as ev


def data(n=120, d=6, classes=3, groups=20, scales=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    emb = (rng.normal(size=(n, d)) + 1.5 * np.eye(classes, d)[y]).astype(np.float32)
    return emb, y, rng.integers(0, groups, n), rng.integers(0, scales, n) * 100 + 40


def assert_close_reports(a, b):
    """Equal structure and integers; floats equal to 1e-9 (FAISS may sum in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close_reports(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close_reports(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-9)
    else:
        assert a == b


def brute_neighbours(q, g, metric, k, q_groups=None, g_groups=None, self_ex=False):
    """Loop reference: distances in float64, ties by gallery index, exclusions applied."""
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        cand = []
        for j in range(len(g)):
            if (self_ex and i == j) or (q_groups is not None and q_groups[i] == g_groups[j]):
                continue
            d = 1 - q[i] @ g[j] if metric == "cosine" else np.linalg.norm(q[i] - g[j])
            cand.append((d, j))
        cand.sort()
        out.append(cand[:k])
    return out


def brute_predict(neigh, g_labels, weights="uniform"):
    pred = []
    for row in neigh:
        votes = {}
        exact = [j for d, j in row if d <= 0]
        for d, j in row:
            w = 1.0 if weights == "uniform" else ((1.0 if j in exact else 0.0) if exact else 1 / d)
            votes[g_labels[j]] = votes.get(g_labels[j], 0.0) + w
        best = max(votes.values())
        pred.append(min(c for c, v in votes.items() if v == best))
    return np.array(pred)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("exclude", ["none", "self", "group"])
def test_knn_equals_brute_force(metric, weights, exclude, backend):
    emb, y, g, _ = data()
    knn = KNNClassifier(k=5, metric=metric, weights=weights, backend=backend)
    knn.fit(emb, y, groups=g)
    got = knn.predict(emb, query_groups=g, exclude=exclude)
    neigh = brute_neighbours(
        emb, emb, metric, 5,
        q_groups=g if exclude == "group" else None, g_groups=g, self_ex=exclude == "self",
    )  # fmt: skip
    np.testing.assert_array_equal(got, brute_predict(neigh, y, weights))
    ids = np.concatenate([nb.ids for nb in knn.kneighbors_chunks(emb, g, exclude)])
    assert ids.tolist() == [[j for _, j in row] for row in neigh]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_equals_sklearn_brute(metric, weights):
    KNeighborsClassifier = pytest.importorskip("sklearn.neighbors").KNeighborsClassifier
    emb, y, _, _ = data(seed=1)
    q = data(n=50, seed=2)[0]
    sk = KNeighborsClassifier(7, weights=weights, algorithm="brute",
                              metric="cosine" if metric == "cosine" else "euclidean")  # fmt: skip
    sk.fit(emb, y)
    ours = KNNClassifier(k=7, metric=metric, weights=weights).fit(emb, y)
    np.testing.assert_array_equal(ours.predict(q), sk.predict(q))
    np.testing.assert_allclose(ours.predict_proba(q), sk.predict_proba(q), atol=1e-5)


@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), groups=st.integers(2, 12))
def test_leave_one_patient_out_never_returns_the_same_patient(seed, k, groups):
    emb, y, g, _ = data(n=60, groups=groups, seed=seed)
    knn = KNNClassifier(k=k).fit(emb, y, groups=g)
    used = 0
    for nb in knn.kneighbors_chunks(emb, g, "group"):
        assert (nb.ids >= 0).all() and nb.ids.shape[1] == k
        assert not (g[nb.ids] == g[nb.rows, None]).any()
        assert (np.diff(nb.dist, axis=1) >= 0).all()
        used += len(nb.ids)
    assert used == 60


def test_chunked_equals_one_shot(monkeypatch):
    emb, y, g, s = data(n=200, seed=3)
    one = evaluate_embeddings(emb, y, g, s, k=5).to_dict()
    monkeypatch.setattr(ev, "CHUNK_ENTRIES", 64)
    knn = KNNClassifier(k=5).fit(emb, y, groups=g)
    assert sum(1 for _ in knn.kneighbors_chunks(emb, g, "group")) > 10
    assert_close_reports(evaluate_embeddings(emb, y, g, s, k=5).to_dict(), one)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("exclude", ["self", "group"])
def test_symmetric_leave_one_out_equals_the_index_search(monkeypatch, metric, exclude, backend):
    rng = np.random.default_rng(3)
    n = 5000  # above SYMMETRIC_MIN_ROWS and over several 2048-row blocks
    y = rng.integers(0, 5, n)
    x = (rng.standard_normal((n, 16)) + y[:, None] * 0.3).astype(np.float32)
    g, s = rng.integers(0, 300, n), rng.integers(0, 4, n)

    def run():
        knn = KNNClassifier(k=7, metric=metric, backend=backend).fit(x, y, g)
        chunks = list(knn.kneighbors_chunks(x, g, exclude))
        report = evaluate_embeddings(x, y, g, s, k=7, exclude=exclude, metric=metric,
                                     map_at_r=False, backend=backend)  # fmt: skip
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


def test_torch_inputs_on_any_device_equal_numpy():
    emb, y, g, s = data(n=80, seed=4)
    a = evaluate_embeddings(torch.from_numpy(emb).double(), torch.from_numpy(y), g, s).to_dict()
    assert_close_reports(a, evaluate_embeddings(emb, y, g, s).to_dict())


@needs_pml
def test_map_at_r_and_precision_at_1_equal_pml():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, y, _, _ = data(n=150, seed=5)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              k="max_bin_count")  # fmt: skip
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for metric, pml_input in (("l2", emb), ("cosine", unit)):
        theirs = calc.get_accuracy(torch.from_numpy(pml_input), torch.from_numpy(y))
        r = evaluate_embeddings(emb, y, k=5, exclude="self", metric=metric)
        assert r.retrieval.precision_at_1 == pytest.approx(theirs["precision_at_1"], abs=1e-6)
        assert r.retrieval.map_at_r == pytest.approx(
            theirs["mean_average_precision_at_r"], abs=1e-6
        )


def test_retrieval_metrics_by_hand():
    # 1-D points; classes a a b b; leave-one-out
    emb = np.array([[0.0], [1.0], [1.5], [10.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    r = evaluate_embeddings(emb, y, k=1, exclude="self", metric="l2", cross_magnification=False)
    # nearest: 0->1 (hit), 1->2 (miss), 2->1 (miss), 3->2 (hit)
    assert r.retrieval.precision_at_1 == 0.5
    # R = 1 for everyone: AP = hit at rank 1
    assert r.retrieval.map_at_r == 0.5
    assert r.pooled.accuracy == 0.5
    assert r.pooled.confusion == [[1, 1], [1, 1]]


def test_patient_level_differs_from_image_level():
    # patient A: 4 images, all right; patient B: 1 image, wrong -> image 4/5, patient (1+0)/2
    y = np.array([0, 0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0, 0])
    groups = np.array(["A", "A", "A", "A", "B"])
    r = evaluate_predictions(pred, y, groups)
    assert r.pooled.accuracy == pytest.approx(0.8)
    assert r.pooled.patient_accuracy == pytest.approx(0.5)
    assert r.pooled.balanced_accuracy == pytest.approx(0.5)  # recall 1.0 and 0.0
    assert r.pooled.precision == pytest.approx([0.8, 0.0])
    assert r.pooled.recall == pytest.approx([1.0, 0.0])
    assert r.pooled.f1 == pytest.approx([2 * 0.8 / 1.8, 0.0])
    assert r.pooled.confusion == [[4, 0], [1, 0]]


def test_per_scale_and_cross_magnification_matrix_equal_brute_force():
    emb, y, g, s = data(n=90, seed=6)
    r = evaluate_embeddings(emb, y, g, s, k=3, metric="l2")
    for name, m in r.per_scale.items():
        sel = s == int(name)
        knn = KNNClassifier(k=3, metric="l2").fit(emb, y, groups=g)
        pred = knn.predict(emb[sel], g[sel], exclude="group")
        assert m.accuracy == pytest.approx((pred == y[sel]).mean())
    for a, qa in enumerate(r.scales):
        for b, gb in enumerate(r.scales):
            q, gal = s == qa, s == gb
            neigh = brute_neighbours(emb[q], emb[gal], "l2", 3, g[q], g[gal])
            pred = brute_predict(neigh, y[gal])
            assert r.cross_magnification[a][b] == pytest.approx((pred == y[q]).mean())
    off = [r.cross_magnification[a][b] for a in range(3) for b in range(3) if a != b]
    assert r.cross_magnification_mean == pytest.approx(np.mean(off))
    assert r.to_json()  # serialisable


def test_separate_gallery_excludes_the_query_patient():
    emb, y, g, s = data(n=100, seed=7)
    q, gal = slice(0, 30), slice(30, None)
    r = evaluate_embeddings(emb[q], y[q], g[q], s[q], k=3, metric="l2",
                            gallery=(emb[gal], y[gal], g[gal], s[gal]))  # fmt: skip
    neigh = brute_neighbours(emb[q], emb[gal], "l2", 3, g[q], g[gal])
    assert r.pooled.accuracy == pytest.approx((brute_predict(neigh, y[gal]) == y[q]).mean())
    # without gallery groups nothing is excluded
    r2 = evaluate_embeddings(emb[q], y[q], None, None, k=3, metric="l2",
                             gallery={"embeddings": emb[gal], "labels": y[gal]})  # fmt: skip
    neigh = brute_neighbours(emb[q], emb[gal], "l2", 3)
    assert r2.pooled.accuracy == pytest.approx((brute_predict(neigh, y[gal]) == y[q]).mean())


@needs_faiss
def test_ivf_index_runs_and_agrees_mostly():
    emb, y, _, _ = data(n=400, seed=8)
    exact = KNNClassifier(k=5).fit(emb, y).predict(emb)
    approx = KNNClassifier(k=5, index="ivf").fit(emb, y).predict(emb)
    assert (exact == approx).mean() > 0.9


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda e, y, g: evaluate_embeddings(e, y[:-1], g), ValueError, "labels has"),
        (lambda e, y, g: evaluate_embeddings(e, y, g[:-1]), ValueError, "groups has"),
        (lambda e, y, g: evaluate_embeddings(e, y, g, k=500), ValueError, "k=500 is larger"),
        (lambda e, y, g: evaluate_embeddings(np.where(e > 2, np.nan, e), y, g), ValueError, "NaN"),
        (lambda e, y, g: evaluate_embeddings(e, y, g, gallery=(e[:0], y[:0], None, None)),
         ValueError, "gallery embeddings is empty"),
        (lambda e, y, g: evaluate_embeddings(e, y, g, exclude="patient"), ValueError, "exclude"),
        (lambda e, y, g: evaluate_embeddings(e, y.astype(float), g), TypeError, "labels"),
        (lambda e, y, g: evaluate_embeddings(e, y, g, gallery=(e, y, g, None), exclude="self"),
         ValueError, "self"),
        (lambda e, y, g: KNNClassifier(k=0), ValueError, "k must be"),
        (lambda e, y, g: KNNClassifier(metric="dot"), ValueError, "metric"),
        (lambda e, y, g: KNNClassifier().fit(e, y).predict(e, exclude="group"), ValueError,
         "groups"),
        pytest.param(lambda e, y, g: KNNClassifier(device="cuda").fit(e, y), ValueError, "GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
        (lambda e, y, g: KNNClassifier(backend="annoy"), ValueError, "backend"),
        (lambda e, y, g: make_index(e, index="ivf", backend="torch"), ValueError, "ivf"),
        (lambda e, y, g: TorchIndex(e).search(e[:, :3], 2), ValueError, "dimension"),
    ],
)  # fmt: skip
def test_bad_input(call, exc, match):
    emb, y, g, _ = data(n=40, seed=9)
    with pytest.raises(exc, match=match):
        call(emb, y, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_index_orders_ties_by_index_like_brute_force(device, metric):
    """A gallery of 300 copies of 12 points: every distance is tied ~25 times, and the
    torch search must order the copies by gallery index on every device."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((12, 5)).astype(np.float32)
    g = base[rng.integers(0, 12, 300)]
    q = np.concatenate([base[:4], rng.standard_normal((6, 5)).astype(np.float32)])
    idx = TorchIndex(torch.from_numpy(g).to(device), metric=metric)
    assert idx.device == device
    dist, ids = idx.search(q, k=25)
    ref = brute_neighbours(q, g, metric, 25)
    assert ids.tolist() == [[j for _, j in row] for row in ref]
    np.testing.assert_allclose(dist, [[d for d, _ in row] for row in ref], atol=1e-5)
    over, over_ids = idx.search(q[:2], k=302)  # more than the gallery holds
    assert (over_ids[:, 300:] == -1).all() and np.isinf(over[:, 300:]).all()


@needs_faiss
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_and_faiss_backends_give_the_same_report(metric):
    emb, y, g, s = data(n=300, seed=12)
    faiss_r = evaluate_embeddings(emb, y, g, s, k=5, metric=metric, backend="faiss")
    torch_r = evaluate_embeddings(emb, y, g, s, k=5, metric=metric, backend="torch")
    assert_close_reports(torch_r.to_dict(), faiss_r.to_dict())
    q = data(n=50, seed=13)[0]
    a = make_index(emb, metric, backend="faiss").search(q, 9)[1]
    b = make_index(emb, metric, backend="torch").search(q, 9)[1]
    np.testing.assert_array_equal(a, b)


def test_without_faiss_the_torch_backend_answers(monkeypatch):
    emb, y, g, s = data(n=150, seed=14)
    before = evaluate_embeddings(emb, y, g, s, k=5, backend="torch").to_dict()
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # no faiss installed
    assert isinstance(make_index(emb), TorchIndex)
    assert isinstance(KNNClassifier().fit(emb, y).index_, TorchIndex)
    assert evaluate_embeddings(emb, y, g, s, k=5).to_dict() == before
    with pytest.raises(ImportError, match=r"smse-metric\[faiss\]"):
        make_index(emb, index="ivf")


@needs_faiss
def test_auto_takes_faiss_when_installed():
    emb = data(n=20)[0]
    assert isinstance(make_index(emb), FaissIndex)
