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
