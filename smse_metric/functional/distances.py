"""Pairwise distances and the label / scale masks of pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    DISTANCE_METRICS,
    block_masks,
    check_choice,
    check_float_matrix,
    full_precision,
    upcast,
)

__all__ = ["cross_scale_mask", "gathered_distances", "label_masks", "pairwise_distances"]


class _EuclideanDistance(torch.autograd.Function):
    """||x_i - y_j|| with a gradient that is zero (not NaN) where the distance is zero.

    ``y=None`` means ``x`` against itself (one input, so ``torch.compile`` can trace
    it). Only the inputs and the output are saved: one [N, M] matrix of activations.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor | None) -> Tensor:
        # Out of place on purpose: torch.compile (2.11) drops the gradient of an
        # autograd.Function whose forward mutates its intermediates.
        other = x if y is None else y
        sq = torch.addmm((other * other).sum(1).unsqueeze(0), x, other.T, alpha=-2.0)
        dist = (sq + (x * x).sum(1, keepdim=True)).clamp_min(0).sqrt()
        if y is None:
            # The expanded form leaves ~sqrt(eps) on the diagonal; the truth is 0.
            eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
            dist = dist.masked_fill(eye, 0)
            ctx.save_for_backward(x, dist)
        else:
            ctx.save_for_backward(x, y, dist)
        return dist

    @staticmethod
    def backward(ctx, grad: Tensor):
        *inputs, dist = ctx.saved_tensors
        w = (grad / dist).masked_fill(dist == 0, 0)
        if len(inputs) == 1:
            (x,) = inputs
            return x * (w.sum(1) + w.sum(0)).unsqueeze(1) - w @ x - w.T @ x, None
        x, y = inputs
        return x * w.sum(1, keepdim=True) - w @ y, y * w.sum(0).unsqueeze(1) - w.T @ x


def pairwise_distances(x: Tensor, y: Tensor | None = None, metric: str = "euclidean") -> Tensor:
    """Distance matrix between the rows of ``x`` [N, D] and ``y`` [M, D] (default: ``x``).

    Args:
        x: [N, D] floating tensor.
        y: [M, D] floating tensor, or None for ``x`` against itself.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``).

    Returns:
        [N, M] tensor in float32 for half inputs, otherwise in the input dtype.
        Gradients are finite everywhere, including at zero distance (duplicate
        embeddings are normal in a batch); there the euclidean gradient is 0.

    Examples:
        >>> d = pairwise_distances(torch.eye(3))
        >>> round(d[0, 1].item(), 4)
        1.4142
    """
    check_float_matrix("x", x)
    check_choice("metric", metric, DISTANCE_METRICS)
    same = y is None
    if y is None:
        y = x
    else:
        check_float_matrix("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y has dimension {y.shape[1]} but x has {x.shape[1]}")
    with full_precision(x.device):
        x, y = upcast(x), upcast(y.to(x.device))
        if metric == "euclidean":
            return _EuclideanDistance.apply(x, None if same else y)
        if metric == "squared_euclidean":
            sq = ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2.0 * (x @ y.T)).clamp_min(0)
            if same:
                # exact zeros on the diagonal, out of place for autograd
                sq = sq.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0)
            return sq
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = torch.nn.functional.normalize(y, dim=1)
        return 1.0 - xn @ yn.T


def _safe_sqrt(sq: Tensor) -> Tensor:
    # Double where: exact 0 and a zero gradient at sq == 0, instead of inf * 0 = NaN.
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, 1).sqrt(), 0)


def gathered_distances(
    emb: Tensor, ref: Tensor, same: bool, index_pairs: list[tuple[Tensor, Tensor]], squared: bool
) -> list[Tensor]:
    """d(emb[i], ref[j]) for each (i, j) index pair, by whichever needs less memory:
    gathering rows (D floats per pair) or one distance matrix (what PML always does).

    Args:
        emb: [B, D] anchors.
        ref: [R, D] reference (``emb`` itself when ``same``).
        same: whether ``ref`` is ``emb``.
        index_pairs: ``(i, j)`` index tensors into ``emb`` and ``ref``.
        squared: squared euclidean distances, else euclidean.

    Examples:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> gathered_distances(x, x, True, [(torch.tensor([0]), torch.tensor([1]))], False)
        [tensor([5.])]
    """
    n_pairs = sum(i.numel() for i, _ in index_pairs)
    if n_pairs * emb.shape[1] <= emb.shape[0] * ref.shape[0]:
        out = []
        for i, j in index_pairs:
            diff = emb[i] - ref[j]
            sq = (diff * diff).sum(1)
            out.append(sq if squared else _safe_sqrt(sq))
        return out
    metric = "squared_euclidean" if squared else "euclidean"
    mat = pairwise_distances(emb, None if same else ref, metric)
    return [mat[i, j] for i, j in index_pairs]


def label_masks(labels: Tensor, ref_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks, each [B, R] bool.

    Without ``ref_labels`` the batch is its own reference and the diagonal (an
    embedding paired with itself) is not a positive. With ``ref_labels`` every
    same-label pair counts, as in pytorch-metric-learning.

    Args:
        labels: [B] integer labels of the anchors.
        ref_labels: [R] labels of the reference (default: the batch itself).

    Examples:
        >>> pos, neg = label_masks(torch.tensor([0, 0, 1]))
        >>> pos.int().tolist(), neg.int().tolist()
        ([[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    """
    same = ref_labels is None
    return block_masks(labels, labels if same else ref_labels, None, None, same, 0, len(labels))


def cross_scale_mask(scales: Tensor, ref_scales: Tensor | None = None) -> Tensor:
    """[B, R] bool mask of pairs whose scales (magnifications) differ.

    Args:
        scales: [B] magnification ids of the anchors.
        ref_scales: [R] magnification ids of the reference (default: ``scales``).

    Examples:
        >>> cross_scale_mask(torch.tensor([40, 100, 40])).int().tolist()
        [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    """
    ref = scales if ref_scales is None else ref_scales
    return scales.unsqueeze(1) != ref.unsqueeze(0)
