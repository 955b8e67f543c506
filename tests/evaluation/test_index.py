"""make_index and FaissIndex: backend choice, FAISS and torch agree, IVF, no faiss installed."""

import numpy as np
import pytest
from helpers import assert_close_reports, knn_data, needs_faiss

from smse_metric import (
    FaissIndex,
    KNNClassifier,
    TorchIndex,
    evaluate_embeddings,
    make_index,
)


@needs_faiss
def test_ivf_index_runs_and_agrees_mostly():
    emb, y, _, _ = knn_data(n=400, seed=8)
    exact = KNNClassifier(k=5).fit(emb, y).predict(emb)
    approx = KNNClassifier(k=5, index="ivf").fit(emb, y).predict(emb)
    assert (exact == approx).mean() > 0.9


@needs_faiss
@pytest.mark.parametrize("distance", ["cosine", "l2", "squared_l2"])
def test_torch_and_faiss_backends_give_the_same_report(distance):
    emb, y, g, s = knn_data(n=300, seed=12)
    faiss_r = evaluate_embeddings(emb, y, g, s, k=5, distance=distance, backend="faiss")
    torch_r = evaluate_embeddings(emb, y, g, s, k=5, distance=distance, backend="torch")
    assert_close_reports(torch_r.to_dict(), faiss_r.to_dict())
    q = knn_data(n=50, seed=13)[0]
    a = make_index(emb, distance, backend="faiss").search(q, 9)[1]
    b = make_index(emb, distance, backend="torch").search(q, 9)[1]
    np.testing.assert_array_equal(a, b)


def test_without_faiss_the_torch_backend_answers(monkeypatch):
    emb, y, g, s = knn_data(n=150, seed=14)
    before = evaluate_embeddings(emb, y, g, s, k=5, backend="torch").to_dict()
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # no faiss installed
    assert isinstance(make_index(emb), TorchIndex)
    assert isinstance(KNNClassifier().fit(emb, y).index_, TorchIndex)
    after = evaluate_embeddings(emb, y, g, s, k=5).to_dict()
    assert after.pop("clustering")["backend"] == "torch"  # k-means too goes without faiss
    before.pop("clustering")
    assert after == before
    with pytest.raises(ImportError, match=r"smse-metric\[faiss\]"):
        make_index(emb, index="ivf")


@needs_faiss
def test_auto_takes_faiss_when_installed():
    emb = knn_data(n=20)[0]
    assert isinstance(make_index(emb), FaissIndex)
