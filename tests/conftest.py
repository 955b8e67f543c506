import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_batch(n: int, d: int, n_classes: int, n_scales: int = 1, seed: int = 0,
               dtype=torch.float64, normalize: bool = True):  # fmt: skip
    """Random tie-free embeddings with labels and scales."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=dtype)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    scales = torch.randint(0, n_scales, (n,), generator=g)
    return emb, labels, scales


@pytest.fixture
def batch():
    return make_batch(20, 6, 3, n_scales=3)
