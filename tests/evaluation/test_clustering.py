"""k-means and the mutual-information scores against scikit-learn."""

import numpy as np
import pytest
from helpers import BACKENDS, needs_faiss, needs_pml
from hypothesis import given, settings
from hypothesis import strategies as st

from smse_metric.evaluation import kmeans, mutual_information


def _labeling(n: int, values: int):
    return st.lists(st.integers(0, values), min_size=n, max_size=n)


labelings = st.integers(1, 40).flatmap(lambda n: st.tuples(_labeling(n, 4), _labeling(n, 6)))


@settings(max_examples=300, deadline=None)
@given(labelings)
def test_nmi_and_ami_equal_scikit_learn(pair):
    metrics = pytest.importorskip("sklearn.metrics")
    y, c = pair
    nmi, ami = mutual_information(y, c)
    assert nmi == pytest.approx(metrics.normalized_mutual_info_score(y, c), abs=1e-12)
    assert ami == pytest.approx(metrics.adjusted_mutual_info_score(y, c), abs=1e-10)


def test_mutual_information_by_hand():
    # one labeling splits in halves, the other ignores the split: MI = 0
    assert mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == (0.0, pytest.approx(-0.5))
    assert mutual_information([0, 0, 1, 1], ["b", "b", "a", "a"]) == (1.0, 1.0)
    assert mutual_information([3, 3, 3], [1, 1, 1]) == (1.0, 1.0)
    assert mutual_information([3, 3, 4], [1, 1, 1]) == (0.0, 0.0)


def test_large_classes_stay_within_memory_and_agree():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 30000)
    c = np.where(rng.random(30000) < 0.4, rng.integers(0, 6, 30000), y)
    nmi, ami = mutual_information(y, c)
    assert nmi == pytest.approx(metrics.normalized_mutual_info_score(y, c), abs=1e-12)
    assert ami == pytest.approx(metrics.adjusted_mutual_info_score(y, c), abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_finds_separated_clusters(backend):
    rng = np.random.default_rng(1)
    centres = np.eye(3, 8) * 30
    y = rng.permutation(np.repeat(np.arange(3), 40))
    x = (centres[y] + rng.normal(size=(120, 8))).astype(np.float32)
    c = kmeans(x, 3, backend=backend)
    assert c.shape == (120,) and set(c.tolist()) == set(range(3))
    assert mutual_information(y, c) == (1.0, 1.0)
    assert np.array_equal(kmeans(x, 3, backend=backend), c)  # deterministic


@needs_faiss
@needs_pml
def test_faiss_kmeans_gives_pmls_clusters():
    import torch
    from pytorch_metric_learning.utils.inference import FaissKMeans

    x = np.random.default_rng(2).normal(size=(300, 6)).astype(np.float32)
    theirs = FaissKMeans(niter=20, gpu=False)(torch.from_numpy(x), 7).numpy()
    assert np.array_equal(kmeans(x, 7, backend="faiss"), theirs)


def test_torch_kmeans_with_duplicate_rows_keeps_every_cluster_index_valid():
    x = np.zeros((10, 3), np.float32)
    x[5:] = 1
    c = kmeans(x, 3, backend="torch")
    assert set(c.tolist()) <= {0, 1, 2} and len(set(c[:5])) == len(set(c[5:])) == 1


@pytest.mark.parametrize(
    "n_clusters, error", [(0, ValueError), (11, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_n_clusters_names_the_argument(n_clusters, error):
    with pytest.raises(error, match="n_clusters"):
        kmeans(np.zeros((10, 2)), n_clusters)
