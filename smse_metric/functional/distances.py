"""Pairwise distances and the label / scale masks of pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import DISTANCES, check_choice, resolve_distance
from ._common import (
    acc_dtype,
    block_masks,
    check_float_matrix,
    full_precision,
    row_blocks,
    upcast,
)

__all__ = ["cross_scale_mask", "gathered_distances", "label_masks", "pairwise_distances"]


#: Distance matrices of at most this many entries are computed by direct differences.
DIRECT_ENTRIES = 1 << 14


def direct_distances(
    x: Tensor, squared: bool, y: Tensor | None = None, rounded: bool = True
) -> Tensor:
    """Distances by float64 direct differences (float32 on MPS), in ``x``'s dtype unless
    not ``rounded``: what the expansion below approximates, in one op (``cdist``) and
    O(N M D) work, which is what small matrices should pay. Duplicates are exactly 0.

    ``cdist`` returns the root: squared distances are its square, exact to far below
    float32 rounding, but not to float64's, so float64 inputs take the expansion."""
    acc = acc_dtype(x)
    if squared and x.dtype == acc:
        return _expansion(x, y, root=False)
    xa = x if x.dtype == acc else x.to(acc)
    ya = xa if y is None else y if y.dtype == acc else y.to(acc)
    d = torch.cdist(xa, ya, compute_mode="donot_use_mm_for_euclid_dist")
    d = d.square() if squared else d
    return d.to(x.dtype) if rounded and d.dtype != x.dtype else d


def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / n, n)`` with ``n = max(|x_i|, 1e-12)`` per row ([N, 1]): the values of
    ``F.normalize`` in three ops, and the divisor its gradient needs."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
    return x / norm, norm


def through_unit_rows(grad: Tensor, n: Tensor, norm: Tensor) -> Tensor:
    """The gradient w.r.t. ``x`` of a function of ``n = x / norm`` (`unit_rows`), given
    its gradient w.r.t. ``n``: the component along ``n`` drops out, the rest is divided
    by the norm. ``F.normalize``'s gradient for rows longer than its 1e-12 floor, and
    for zero rows (``n = 0``)."""
    return (grad - n * (n * grad).sum(1, keepdim=True)) / norm


def cosine_distances(xn: Tensor, yn: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``1 - cos`` of rows already normalised in the accumulation dtype (`unit_rows`),
    as ``|xn - yn|^2 / 2`` in ``dtype``: never negative, exactly 0 for duplicates. Small
    matrices of a narrower ``dtype`` take direct differences (`direct_distances`); the
    others the snapped float64 expansion."""
    ny = len(xn) if yn is None else len(yn)
    if dtype != xn.dtype and len(xn) * ny <= DIRECT_ENTRIES:
        d = torch.cdist(xn, xn if yn is None else yn, compute_mode="donot_use_mm_for_euclid_dist")
        return d.square().to(dtype) / 2
    return _accurate(xn, yn, root=False).to(dtype) / 2


def block_distances(x: Tensor, y: Tensor, start: int, stop: int) -> Tensor:
    """Euclidean distances of ``x``'s rows ``start:stop`` against ``y``, each entry what
    the whole matrix's `_accurate` computes for it (so blocks of one matrix agree)."""
    if len(x) * len(y) <= DIRECT_ENTRIES:
        return direct_distances(x[start:stop], False, y)
    return _expansion(x[start:stop], y, root=True)


def _accurate(x: Tensor, y: Tensor | None, root: bool) -> Tensor:
    """`direct_distances` (``root``: euclidean) for matrices of at most `DIRECT_ENTRIES`
    entries, otherwise `_expansion`."""
    if len(x) * len(x if y is None else y) <= DIRECT_ENTRIES:
        return direct_distances(x, not root, y)
    return _expansion(x, y, root)


def _expansion(x: Tensor, y: Tensor | None, root: bool) -> Tensor:
    """||x_i - y_j||^2 (or, ``root``, the distance), computed with float64 products
    (float32 on MPS) and returned in ``x``'s dtype: accurate where the float32 expansion
    ``|x|^2 + |y|^2 - 2 x.y`` is not.

    The expansion cancels: its float32 error is about ``eps * (|x|^2 + |y|^2)``, which for
    close points is as large as the distance itself (2e-5 on unit vectors 1 degree apart;
    4.9e-4 for a duplicate). Products of float32 numbers are exact in float64, so the
    float64 expansion errs by at most ``(D + 2) * eps64 * (|x|^2 + |y|^2)``, below float32
    rounding of the result; entries within ``4 D eps64 (|x|^2 + max |y|^2)`` (duplicates,
    and points a few float32 ulps apart) are exactly 0. Rows go in blocks of 2^22
    entries so the float64 temporaries stay small whatever the batch.
    """
    acc = acc_dtype(x)
    ya = (x if y is None else y).to(acc)
    ny = (ya * ya).sum(1)
    # a non-finite row must neither blunt the snap of the others nor be snapped itself
    # (an infinite row's threshold is infinite): it keeps its inf / NaN distances
    ny_max = torch.where(ny.isfinite(), ny, 0).max()
    bound = 4 * x.shape[1] * torch.finfo(acc).eps
    blocks = row_blocks(len(x), len(ya), 1 << 22)
    # several blocks are written into one result (a concatenation would hold it twice)
    out = None if len(blocks) == 1 else x.new_empty(len(x), len(ya))
    for start, stop in blocks:
        xa = x[start:stop].to(acc)
        nx = (xa * xa).sum(1, keepdim=True)
        # in place on this block's own temporaries: a third of the memory traffic
        # rounded to x's dtype first: the snap and the root then touch half the bytes
        sq = torch.addmm(nx, xa, ya.T, alpha=-2.0).add_(ny).to(x.dtype)
        near = sq <= (bound * (nx + ny_max)).to(x.dtype)  # per row, all pairs
        sq.masked_fill_(near.logical_and_(sq.isfinite()), 0)
        sq = sq.sqrt_() if root else sq
        if out is None:
            return sq
        out[start:stop] = sq
    return out


def _weighted_differences(w: Tensor, x: Tensor, y: Tensor | None, need=(True, True)):
    """``(sum_j w_ij (x_i - y_j), sum_i w_ij (y_j - x_i))``: the gradients of
    ``sum(w * |x_i - y_j|^2) / 2`` w.r.t. ``x`` and ``y`` (None where not ``need``ed);
    ``y=None``: ``x`` against itself, one gradient (and None)."""
    if y is None:
        return x * (w.sum(1) + w.sum(0)).unsqueeze(1) - w @ x - w.T @ x, None
    gx = x * w.sum(1, keepdim=True) - w @ y if need[0] else None
    return gx, y * w.sum(0).unsqueeze(1) - w.T @ x if need[1] else None


class _Distance(torch.autograd.Function):
    """Euclidean or squared euclidean distances, accurate in value (see `_accurate`),
    with a closed-form gradient that is zero (not NaN) where a
    euclidean distance is zero.

    ``y=None`` means ``x`` against itself (one input, so ``torch.compile`` can trace
    it). Only the inputs and the output are saved: one [N, M] matrix of activations.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor | None, squared: bool) -> Tensor:
        dist = _accurate(x, y, root=not squared)
        ctx.squared = squared
        if y is None:
            ctx.save_for_backward(x, dist)
        else:
            ctx.save_for_backward(x, y, dist)
        return dist

    @staticmethod
    def backward(ctx, grad: Tensor):
        *inputs, dist = ctx.saved_tensors
        # d sq / dx = 2 (x - y); d ||x - y|| / dx = (x - y) / d
        w = 2.0 * grad if ctx.squared else (grad / dist).masked_fill(dist == 0, 0)
        x, y = inputs if len(inputs) == 2 else (inputs[0], None)
        return (*_weighted_differences(w, x, y), None)


class _Cosine(torch.autograd.Function):
    """`cosine_distances` of ``x``'s rows against ``y``'s (None: ``x`` itself), with a
    closed-form gradient in the input dtype: with ``d = |n_i - m_j|^2 / 2``,
    ``dd/dn_i = n_i - m_j``, then `through_unit_rows`. Saves the inputs alone, not the
    float64 blocks of the product; the backward renormalises them with differentiable
    ops, so second derivatives are right too."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor | None) -> Tensor:
        acc = acc_dtype(x)
        xn = unit_rows(x.to(acc))[0]
        yn = None if y is None else unit_rows(y.to(acc))[0]
        ctx.save_for_backward(*((x,) if y is None else (x, y)))
        return cosine_distances(xn, yn, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (n, n_norm), *ref = (unit_rows(t) for t in ctx.saved_tensors)
        m, m_norm = ref[0] if ref else (None, None)
        gn, gm = _weighted_differences(grad, n, m, ctx.needs_input_grad)
        gx = None if gn is None else through_unit_rows(gn, n, n_norm)
        return gx, None if gm is None else through_unit_rows(gm, m, m_norm)


def pairwise_distances(
    x: Tensor, y: Tensor | None = None, distance: str | None = None, *, metric: str | None = None
) -> Tensor:
    """Distance matrix between the rows of ``x`` [N, D] and ``y`` [M, D] (default: ``x``).

    Args:
        x: [N, D] floating tensor.
        y: [M, D] floating tensor, or None for ``x`` against itself.
        distance: ``"l2"`` (default), ``"squared_l2"`` or ``"cosine"`` (``1 - cos``).
        metric: the old name of ``distance`` (with the old values ``"euclidean"``,
            ``"squared_euclidean"``); deprecated, warns.

    Returns:
        [N, M] tensor in float32 for half inputs, otherwise in the input dtype, equal to
        the directly computed distance up to rounding to that dtype (the products are
        accumulated in float64): duplicates are exactly 0 and near-ties keep their order.
        Gradients are finite everywhere, including at zero distance (duplicate
        embeddings are normal in a batch); there the euclidean gradient is 0.

    Examples:
        >>> d = pairwise_distances(torch.eye(3))
        >>> round(d[0, 1].item(), 4)
        1.4142
    """
    check_float_matrix("x", x)
    distance = resolve_distance(distance, "l2", metric=metric)
    same = y is None
    if y is None:
        y = x
    else:
        check_float_matrix("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y has dimension {y.shape[1]} but x has {x.shape[1]}")
    with full_precision(x.device):
        x, y = upcast(x), upcast(y.to(x.device))
        if distance != "cosine":
            return _Distance.apply(x, None if same else y, distance == "squared_l2")
        # 1 - cos = |x/|x| - y/|y||^2 / 2, not 1 - x.y, which cancels for close points:
        # normalised in float64, then as accurate as the euclidean distances
        return _Cosine.apply(x, None if same else y)


def _safe_sqrt(sq: Tensor) -> Tensor:
    # Double where: exact 0 and a zero gradient at sq == 0, instead of inf * 0 = NaN.
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, 1).sqrt(), 0)


def gathered_distances(
    emb: Tensor, ref: Tensor, same: bool, index_pairs: list[tuple[Tensor, Tensor]], distance: str
) -> list[Tensor]:
    """d(emb[i], ref[j]) for each (i, j) index pair, by whichever needs less memory:
    gathering rows (D floats per pair) or one distance matrix (what PML always does).

    Args:
        emb: [B, D] anchors.
        ref: [R, D] reference (``emb`` itself when ``same``).
        same: whether ``ref`` is ``emb``.
        index_pairs: ``(i, j)`` index tensors into ``emb`` and ``ref``.
        distance: ``"l2"``, ``"squared_l2"`` or ``"cosine"`` (``1 - cos``).

    Examples:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> gathered_distances(x, x, True, [(torch.tensor([0]), torch.tensor([1]))], "l2")
        [tensor([5.])]
    """
    check_choice("distance", distance, DISTANCES)
    n_pairs = sum(i.numel() for i, _ in index_pairs)
    if n_pairs * emb.shape[1] <= emb.shape[0] * ref.shape[0]:
        if distance == "cosine":  # 1 - cos = |x/|x| - y/|y||^2 / 2
            emb, ref = (
                torch.nn.functional.normalize(emb, dim=1),
                torch.nn.functional.normalize(ref, dim=1),
            )
        out = []
        for i, j in index_pairs:
            diff = emb[i] - ref[j]
            sq = (diff * diff).sum(1)
            out.append(
                {
                    "l2": _safe_sqrt,
                    "squared_l2": lambda v: v,
                    "cosine": lambda v: v / 2,
                }[distance](sq)
            )
        return out
    mat = pairwise_distances(emb, None if same else ref, distance)
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
