"""KNNClassifier against brute force and scikit-learn, with exclusions and chunking."""

import numpy as np
import pytest
from helpers import BACKENDS, assert_close_reports, knn_data
from hypothesis import given
from hypothesis import strategies as st
from reference import brute_neighbours, brute_predict

from smse_metric import (
    KNNClassifier,
    evaluate_embeddings,
)
from smse_metric.evaluation import knn as ev


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["cosine", "l2", "squared_l2"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("exclude", ["none", "self", "group"])
def test_knn_equals_brute_force(distance, weights, exclude, backend):
    emb, y, g, _ = knn_data()
    knn = KNNClassifier(k=5, distance=distance, weights=weights, backend=backend)
    knn.fit(emb, y, groups=g)
    got = knn.predict(emb, query_groups=g, exclude=exclude)
    neigh = brute_neighbours(
        emb,
        emb,
        distance,
        5,
        q_groups=g if exclude == "group" else None,
        g_groups=g,
        self_ex=exclude == "self",
    )
    np.testing.assert_array_equal(got, brute_predict(neigh, y, weights))
    ids = np.concatenate([nb.ids for nb in knn.kneighbors_chunks(emb, g, exclude)])
    assert ids.tolist() == [[j for _, j in row] for row in neigh]


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_equals_sklearn_brute(distance, weights):
    KNeighborsClassifier = pytest.importorskip("sklearn.neighbors").KNeighborsClassifier
    emb, y, _, _ = knn_data(seed=1)
    q = knn_data(n=50, seed=2)[0]
    sk = KNeighborsClassifier(
        7,
        weights=weights,
        algorithm="brute",
        metric="cosine" if distance == "cosine" else "euclidean",
    )
    sk.fit(emb, y)
    ours = KNNClassifier(k=7, distance=distance, weights=weights).fit(emb, y)
    np.testing.assert_array_equal(ours.predict(q), sk.predict(q))
    np.testing.assert_allclose(ours.predict_proba(q), sk.predict_proba(q), atol=1e-5)


@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), groups=st.integers(2, 12))
def test_leave_one_patient_out_never_returns_the_same_patient(seed, k, groups):
    emb, y, g, _ = knn_data(n=60, groups=groups, seed=seed)
    knn = KNNClassifier(k=k).fit(emb, y, groups=g)
    used = 0
    for nb in knn.kneighbors_chunks(emb, g, "group"):
        assert (nb.ids >= 0).all() and nb.ids.shape[1] == k
        assert not (g[nb.ids] == g[nb.rows, None]).any()
        assert (np.diff(nb.dist, axis=1) >= 0).all()
        used += len(nb.ids)
    assert used == 60


def test_chunked_equals_one_shot(monkeypatch):
    emb, y, g, s = knn_data(n=200, seed=3)
    one = evaluate_embeddings(emb, y, g, s, k=5).to_dict()
    monkeypatch.setattr(ev, "CHUNK_ENTRIES", 64)
    knn = KNNClassifier(k=5).fit(emb, y, groups=g)
    assert sum(1 for _ in knn.kneighbors_chunks(emb, g, "group")) > 10
    assert_close_reports(evaluate_embeddings(emb, y, g, s, k=5).to_dict(), one)
