"""TorchIndex against brute force, ties included, on every device."""

import numpy as np
import pytest
import torch
from helpers import DEVICES
from reference import brute_neighbours

from smse_metric import (
    TorchIndex,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["cosine", "l2", "squared_l2"])
def test_torch_index_orders_ties_by_index_like_brute_force(device, distance):
    """A gallery of 300 copies of 12 points: every distance is tied ~25 times, and the
    torch search must order the copies by gallery index on every device."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((12, 5)).astype(np.float32)
    g = base[rng.integers(0, 12, 300)]
    q = np.concatenate([base[:4], rng.standard_normal((6, 5)).astype(np.float32)])
    idx = TorchIndex(torch.from_numpy(g).to(device), distance=distance)
    assert idx.device == device
    dist, ids = idx.search(q, k=25)
    ref = brute_neighbours(q, g, distance, 25)
    assert ids.tolist() == [[j for _, j in row] for row in ref]
    np.testing.assert_allclose(dist, [[d for d, _ in row] for row in ref], atol=1e-5)
    over, over_ids = idx.search(q[:2], k=302)  # more than the gallery holds
    assert (over_ids[:, 300:] == -1).all() and np.isinf(over[:, 300:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_device_embeddings_stay_on_the_device(device, monkeypatch):
    """A CUDA gallery and CUDA queries are checked and searched on the GPU, never
    copied to the host (the host path is made to fail); a CPU index keeps the caller's
    array as its storage, without a copy."""
    from smse_metric import KNNClassifier
    from smse_metric.evaluation import knn as ev
    from smse_metric.evaluation import torch_index

    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, (700, 6)).astype(np.float32)
    groups = rng.integers(0, 70, 700)
    want = KNNClassifier(k=4, distance="l2", backend="torch").fit(x, groups % 2, groups)
    want_ids = np.concatenate([c.ids for c in want.kneighbors_chunks(x[:50], groups[:50])])
    if device == "cuda":

        def host_copy(name, value):
            raise AssertionError(f"{name} went to the host")

        monkeypatch.setattr(torch_index, "as_float32", host_copy)
        monkeypatch.setattr(ev, "as_float32", host_copy)
    xt = torch.from_numpy(x).to(device)
    idx = TorchIndex(xt, distance="l2")
    assert idx.tensor().device.type == device
    if device == "cpu":
        assert np.shares_memory(idx.vectors(), idx.tensor().numpy())
    knn = KNNClassifier(k=4, distance="l2", backend="torch").fit(xt, groups % 2, groups)
    ids = np.concatenate([c.ids for c in knn.kneighbors_chunks(xt[:50], groups[:50])])
    np.testing.assert_array_equal(ids, want_ids)
    loo = np.concatenate([c.ids for c in knn.kneighbors_chunks(xt, groups, "group")])
    want_loo = np.concatenate([c.ids for c in want.kneighbors_chunks(x, groups, "group")])
    np.testing.assert_array_equal(loo, want_loo)
