"""Clustering quality of embeddings: k-means with one cluster per class, scored by
normalised and adjusted mutual information (PML's ``NMI`` and ``AMI``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_choice
from ._inputs import BACKENDS, as_float32, as_ids, has_faiss, import_faiss

__all__ = ["ClusteringMetrics", "kmeans", "mutual_information"]

#: Lloyd iterations and seed of PML's ``FaissKMeans`` (faiss's default seed)
NITER, SEED = 20, 1234


@dataclass
class ClusteringMetrics:
    """k-means on the query embeddings (one cluster per class) against the labels.

    Attributes:
        nmi: normalised mutual information (arithmetic mean of the entropies, as
            scikit-learn and PML).
        ami: mutual information adjusted for chance (same normalisation).
        n_clusters: clusters asked of k-means: the number of distinct query labels.
        backend: ``"faiss"`` (PML's k-means: ``faiss.Kmeans``, 20 iterations, seed
            1234) or ``"torch"`` (Lloyd from k-means++ seeds; other clusters, same
            definitions).

    Examples:
        >>> from smse_metric.evaluation import evaluate_embeddings
        >>> emb = np.array([[0.0], [0.1], [5.0], [5.1]], dtype="float32")
        >>> c = evaluate_embeddings(emb, [0, 0, 1, 1], k=1, exclude="self").clustering
        >>> c.nmi, c.ami, c.n_clusters
        (1.0, 1.0, 2)
    """

    nmi: float
    ami: float
    n_clusters: int
    backend: str


def kmeans(embeddings: Any, n_clusters: int, backend: str = "auto", seed: int = SEED) -> np.ndarray:
    """[N] cluster of each row (0 .. n_clusters - 1) after `NITER` Lloyd iterations.

    Args:
        embeddings: [N, D] numpy or torch.
        n_clusters: clusters wanted (at most N).
        backend: ``"auto"`` (faiss where installed), ``"faiss"`` or ``"torch"``.
        seed: initialisation seed.

    Examples:
        >>> x = np.array([[0.0], [0.1], [5.0], [5.1]], dtype="float32")
        >>> c = kmeans(x, 2, backend="torch")
        >>> bool(c[0] == c[1] != c[2] == c[3])
        True
    """
    check_choice("backend", backend, BACKENDS)
    x = as_float32("embeddings", embeddings)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise TypeError(f"n_clusters must be an integer, got {n_clusters!r}")
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters must be in 1..{len(x)} (the rows), got {n_clusters}")
    if backend == "faiss" or (backend == "auto" and has_faiss()):
        # min_points_per_centroid only decides faiss's "too few points" warning (noise
        # for a small split); the clusters are PML's all the same
        km = import_faiss().Kmeans(
            x.shape[1], int(n_clusters), niter=NITER, seed=seed, min_points_per_centroid=1
        )
        km.train(x)
        return km.index.search(x, 1)[1][:, 0].astype(np.int64)
    return _torch_kmeans(torch.from_numpy(x).double(), int(n_clusters), seed).numpy()


def _torch_kmeans(x: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, c):  # k-means++: next seed drawn in proportion to d^2
        d2 = torch.cdist(x, centres).pow(2).min(1).values
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        centres = torch.cat([centres, x[torch.multinomial(weights, 1, generator=gen)]])
    for _ in range(NITER):
        assign = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=c).unsqueeze(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        # an emptied cluster keeps its centre
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return torch.cdist(x, centres).argmin(1)


def mutual_information(labels: Any, clusters: Any) -> tuple[float, float]:
    """(NMI, AMI) of two labelings, both normalised by the arithmetic mean of the
    entropies (scikit-learn's and PML's default).

    Args:
        labels: [N] true classes (ints or strings).
        clusters: [N] assigned clusters.

    Examples:
        >>> mutual_information([0, 0, 1, 1], [5, 5, 7, 7])
        (1.0, 1.0)
    """
    y = np.unique(as_ids("labels", labels, len(np.asarray(labels))), return_inverse=True)[1]
    c = np.unique(as_ids("clusters", clusters, len(y)), return_inverse=True)[1]
    n = len(y)
    table = np.bincount(y * (c.max() + 1) + c, minlength=(y.max() + 1) * (c.max() + 1))
    table = table.reshape(y.max() + 1, c.max() + 1).astype(np.float64)
    a, b = table.sum(1), table.sum(0)
    if len(a) == len(b) == 1:
        return 1.0, 1.0  # neither labeling splits the data: a perfect match
    if len(a) == 1 or len(b) == 1:
        return 0.0, 0.0
    nz = table > 0
    terms = table[nz] / n * np.log(n * table[nz] / np.outer(a, b)[nz])
    mi = max(float(np.where(np.abs(terms) < EPS, 0.0, terms).sum()), 0.0)
    mean_h = (_entropy(a, n) + _entropy(b, n)) / 2
    nmi = 0.0 if mi == 0 else mi / mean_h
    emi = _expected_mutual_information(a, b, n)
    # as scikit-learn: rounding can put E[MI] just above MI or the mean entropy;
    # keep each difference at least eps away from 0 with its sign
    return float(nmi), _signed_eps(mi - emi) / _signed_eps(mean_h - emi)


EPS = float(np.finfo(np.float64).eps)


def _signed_eps(x: float) -> float:
    return min(x, -EPS) if x < 0 else max(x, EPS)


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def _expected_mutual_information(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """E[MI] under random labelings with the same marginals (Vinh et al. 2010),
    summed over every cell's possible counts with log-gamma terms."""
    lg = torch.special.gammaln
    a_t, b_t = torch.from_numpy(a)[:, None], torch.from_numpy(b)[None, :]
    nf = torch.tensor(float(n), dtype=torch.float64)
    lo = torch.clamp(a_t + b_t - n, min=1)
    hi = torch.minimum(a_t, b_t)
    width = int((hi - lo).max().item()) + 1 if (hi >= lo).any() else 0
    total = torch.zeros((), dtype=torch.float64)
    step = max(1, (1 << 22) // max(a_t.numel() * b_t.numel(), 1))
    base = lg(a_t + 1) + lg(b_t + 1) + lg(nf - a_t + 1) + lg(nf - b_t + 1) - lg(nf + 1)
    for start in range(0, width, step):  # bounded memory for large classes
        nij = lo.unsqueeze(-1) + torch.arange(start, min(width, start + step), dtype=torch.float64)
        valid = nij <= hi.unsqueeze(-1)
        nij = torch.where(valid, nij, torch.ones_like(nij))
        at, bt = a_t.unsqueeze(-1), b_t.unsqueeze(-1)
        log_p = (
            base.unsqueeze(-1)
            - lg(nij + 1)
            - lg(at - nij + 1)
            - lg(bt - nij + 1)
            - lg(nf - at - bt + nij + 1)
        )
        term = nij / n * torch.log(n * nij / (at * bt)) * torch.exp(log_p)
        total = total + torch.where(valid, term, torch.zeros_like(term)).sum()
    return float(total)
