import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from smse_metric import ContrastiveLoss, TripletMarginLoss

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")

torch.set_num_threads(min(2, torch.get_num_threads()))

#: one test body for every device: CPU always, CUDA where a GPU exists
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda,
               pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]  # fmt: skip
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="needs faiss (the [faiss] extra)"
)
needs_pml = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_metric_learning") is None,
    reason="needs pytorch-metric-learning (the [pml] extra)",
)
#: the exact search backends of smse_metric.evaluation
BACKENDS = [pytest.param("faiss", marks=needs_faiss), "torch"]


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


def metric_losses():
    """One of each metric loss configuration the property tests sweep."""
    return [
        TripletMarginLoss(0.3, triplets="all"),
        TripletMarginLoss(0.3, triplets="semihard", reduction="mean"),
        TripletMarginLoss(0.3, triplets="hard", reduction="sum"),
        TripletMarginLoss(0.3, squared=True, triplets="batch_hard"),
        TripletMarginLoss(0.3, cross_scale=True),
        ContrastiveLoss(0.8),
        ContrastiveLoss(0.8, cross_scale=True, reduction="mean_nonzero"),
    ]
