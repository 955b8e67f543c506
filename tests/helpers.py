"""Shared test helpers: devices, optional-package markers, batches, comparisons."""

import contextlib
import importlib.util

import numpy as np
import pytest
import torch

from smse_metric import ContrastiveLoss, TripletMarginLoss
from smse_metric.functional import _small_batch as small_batch

try:  # the [pml] extra; a core-only install runs everything else
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
except ImportError:
    pml_losses = pml_miners = None

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: the marks of a CUDA case: skipped with the reason where no GPU exists
CUDA_MARKS = [pytest.mark.cuda, needs_cuda]
#: one test body for every device: CPU always, CUDA where a GPU exists
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="needs faiss (the [faiss] extra)"
)
needs_pml = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_metric_learning") is None,
    reason="needs pytorch-metric-learning (the [pml] extra)",
)
#: the exact search backends of smse_metric.evaluation
BACKENDS = [pytest.param("faiss", marks=needs_faiss), "torch"]


#: fused triplet selections and the reductions of the metric losses
FUSED = ["all", "semihard", "hard", "batch_hard"]
REDUCTIONS = ["mean_nonzero", "mean", "sum"]
#: the two implementations of the fused losses over one batch
FUSED_PATHS = ["small", "sorted"]


@contextlib.contextmanager
def fused_path(path: str):
    """Run the fused losses on one path: "small" (the launch-light autograd Functions,
    batches up to SMALL_BATCH) or "sorted" (the sorted, blocked path every larger batch
    takes), so that one test checks both."""
    saved = small_batch.SMALL_BATCH, small_batch.SMALL_BATCH_CPU
    if path == "sorted":
        small_batch.SMALL_BATCH = small_batch.SMALL_BATCH_CPU = 0
    try:
        yield
    finally:
        small_batch.SMALL_BATCH, small_batch.SMALL_BATCH_CPU = saved


def make_batch(
    n: int,
    d: int,
    n_classes: int,
    n_scales: int = 1,
    seed: int = 0,
    dtype=torch.float64,
    normalize: bool = True,
):
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
        TripletMarginLoss(0.3, distance="squared_l2", triplets="batch_hard"),
        TripletMarginLoss(0.3, cross_scale=True),
        TripletMarginLoss(0.3, triplets="semihard", cross_scale=True, distance="cosine"),
        TripletMarginLoss(0.3, triplets="batch_hard", distance="cosine"),
        ContrastiveLoss(0.8),
        ContrastiveLoss(0.8, cross_scale=True, reduction="mean_nonzero"),
    ]


def unit(e):
    return torch.nn.functional.normalize(e, dim=1)


def value_and_grad(fn, emb):
    emb = emb.detach().clone().requires_grad_()
    out = fn(emb)
    (g,) = torch.autograd.grad(out, emb, allow_unused=True)
    return out.detach(), torch.zeros_like(emb) if g is None else g


def assert_same(fn_a, fn_b, emb, atol=1e-9):
    """Equal values and gradients of two functions of the embeddings."""
    va, ga = value_and_grad(fn_a, emb)
    vb, gb = value_and_grad(fn_b, emb)
    torch.testing.assert_close(va, vb.to(va.dtype), atol=atol, rtol=1e-7)
    torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-7)


def knn_data(n=120, d=6, classes=3, groups=20, scales=3, seed=0):
    """Embeddings, labels, patients and magnifications with some class structure."""
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


def clusters(seed: int, n: int = 12, d: int = 8, spread: float = 1e-4, classes: int = 2):
    """Float32 points in tight clusters around three random unit vectors, and labels:
    within-cluster distances are about ``spread``, far below the norms, so the float32
    expansion |x|^2 + |y|^2 - 2x.y cannot order them (near ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(3, d, generator=g, dtype=torch.float64), 1)
    pts = base[torch.randint(0, 3, (n,), generator=g)]
    pts = pts + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    return pts.float(), torch.randint(0, classes, (n,), generator=g)
