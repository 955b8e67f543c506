"""Internal: launch-light fused losses for the batches that training uses.

At a batch of 32 the composed fused losses run 46-88 top-level aten ops forward +
backward for a fraction of a millisecond of arithmetic: on a GPU, launches dominate.
Here each loss over one batch is a single ``torch.autograd.Function`` whose forward is a
handful of whole-batch ops (direct-difference distances, one [B, B, B] comparison for
the triplet counts) and whose backward is closed-form: the loss is linear in the
distances near the input, with coefficients the forward has counted, and the gradient of
``sum(coef * dist)`` w.r.t. the embeddings is one matrix product. Exact (the selections
and counts of the sorted path and the miner, which use the same direct-difference
distances at these sizes), with no host synchronisation and static shapes, so a training
step that uses them can be captured in a CUDA graph.

Used for at most `SMALL_BATCH` embeddings against themselves (`SMALL_BATCH_CPU` for the
triplet windows on the CPU), with any distance (the contrastive loss is euclidean); larger
batches and reference sets take the sorted, blocked path. Cosine distances are
``|n_i - n_j|^2 / 2`` of the unit rows ``n = x / |x|``: squared euclidean ones in ``n``,
whose gradient goes back through the normalisation in closed form too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype
from .distances import (
    DIRECT_ENTRIES,
    cosine_distances,
    direct_distances,
    through_unit_rows,
    unit_rows,
)

#: Largest batch of these paths on a GPU: 2^21 triplet comparisons, a few MiB of
#: temporaries, and a distance matrix of `DIRECT_ENTRIES` entries, so that the miners
#: see the same values.
SMALL_BATCH = 128
#: On the CPU launches cost little and the B^3 work of the triplet windows shows: the
#: sorted path is as fast at 64 and 5x faster at 128 (benchmarks/results/launch.md);
#: batch-hard and the contrastive loss have no B^3 term and stay on this path
SMALL_BATCH_CPU = 48
if max(SMALL_BATCH, SMALL_BATCH_CPU) ** 2 > DIRECT_ENTRIES:
    raise ImportError("SMALL_BATCH must not exceed the direct-difference distance size")


#: d dist / d x_i = FACTOR * (x_i - x_j) * weight (cosine: with n in place of x)
_FACTOR = {"l2": 1.0, "squared_l2": 2.0, "cosine": 1.0}


def uses_small_batch(emb: Tensor, same: bool, cubic: bool = False) -> bool:
    """Whether a loss over ``emb`` takes this path; ``cubic``: the triplet windows."""
    cpu_cubic = cubic and emb.device.type == "cpu"
    limit = min(SMALL_BATCH_CPU, SMALL_BATCH) if cpu_cubic else SMALL_BATCH
    return same and len(emb) <= limit


def _distances(x: Tensor, distance: str, rounded: bool = True):
    """The batch's distances as the miners compute them, and for cosine ``(n, |x|)``,
    the unit rows in ``x``'s dtype and the [B, 1] norms, else None. Euclidean distances
    stay in float64 unless ``rounded``; cosine ones are always rounded to ``x``'s
    dtype, as the sorted path chooses on them."""
    if distance != "cosine":
        return direct_distances(x, distance == "squared_l2", rounded=rounded), None
    xn, norm = unit_rows(x.to(acc_dtype(x)))
    return cosine_distances(xn, None, x.dtype), (xn.to(x.dtype), norm.to(x.dtype))


def _masks(labels: Tensor, scales: Tensor | None, d: Tensor) -> tuple[Tensor, Tensor]:
    """(``d`` at negatives and +inf elsewhere, the positive mask)."""
    eq = labels[:, None] == labels
    d_neg = torch.where(eq, float("inf"), d)
    if scales is None:
        return d_neg, eq.fill_diagonal_(False)
    return d_neg, eq & (scales[:, None] != scales)  # the diagonal has equal scales


def _weights(coef: Tensor, d: Tensor, distance: str) -> Tensor:
    """d dist / d x_i = FACTOR (x_i - x_j) * weight: the euclidean distance divides by d
    and is given gradient 0 where d = 0 (duplicates)."""
    if distance != "l2":
        return coef
    return torch.nan_to_num(coef / d, nan=0.0, posinf=0.0, neginf=0.0)


def _finish(
    ctx,
    total: Tensor,
    count: Tensor | int | None,
    x: Tensor,
    weights: Tensor,
    distance: str,
    unit: tuple[Tensor, Tensor] | None = None,
    symmetric: bool = False,
) -> Tensor:
    """Keep what the backward needs and reduce: ``total / max(count, 1)`` (None: the
    sum). ``weights``: the gradient of ``total`` w.r.t. the distances, passed through
    `_weights`; ``unit``: cosine's unit rows and norms (`_distances`); ``symmetric``:
    the weights are symmetric."""
    f = _FACTOR[distance]
    ctx.factor, ctx.symmetric, ctx.distance = (2 * f if symmetric else f), symmetric, distance
    saved = (x, weights) if unit is None else (*unit, weights)
    if isinstance(count, Tensor):
        denom = count.clamp_min(1)
        ctx.scale = None
        ctx.save_for_backward(*saved, denom)
        return total / denom
    ctx.scale = None if count is None else 1.0 / max(count, 1)
    ctx.save_for_backward(*saved)
    return total if count is None else total * ctx.scale


def _backward(ctx, grad: Tensor, n_other: int) -> tuple[Tensor | None, ...]:
    """The gradient of ``scale * sum(w * dist)`` w.r.t. ``x``, with dist = d(x_i, x_j):
    ``f (x * rowsum(W) - W @ x)`` for ``W = w + w^T``; for cosine that is the gradient
    w.r.t. the unit rows ``n``, and through ``n = x / |x|`` it loses its component
    along ``n`` and is divided by ``|x|`` (``F.normalize``'s gradient, exact for rows
    longer than its 1e-12 floor and for zero rows)."""
    if torch.is_grad_enabled() and ctx.distance != "squared_l2":
        # the weights (1 / d) and the unit rows were computed here, not by autograd:
        # their derivatives would be missing, so refuse rather than return a wrong one
        raise RuntimeError(
            f"second derivatives of the launch-light {ctx.distance} losses (batches of at "
            f"most {SMALL_BATCH} against themselves) are not implemented; use the "
            "squared euclidean distance, or mine the tuples and pass indices_tuple"
        )
    # indexing only: dynamo (torch 2.11) cannot trace list.pop on the saved tensors
    saved = ctx.saved_tensors
    x = saved[0]
    first = 2 if ctx.distance == "cosine" else 1
    norm = saved[1] if ctx.distance == "cosine" else None
    w = saved[first]
    denom = saved[first + 1 :]
    scale = grad / denom[0] if denom else grad if ctx.scale is None else grad * ctx.scale
    if not ctx.symmetric:
        w = w + w.T
    f = ctx.factor
    gx = torch.addmm(x * w.sum(1, keepdim=True), w, x, beta=f, alpha=-f)
    if norm is not None:
        gx = through_unit_rows(gx, x, norm)
    return gx.mul_(scale), *(None,) * n_other


class _Triplets(torch.autograd.Function):
    """Every selected triplet of the batch on one [B, P, N] comparison."""

    @staticmethod
    def forward(ctx, x, labels, scales, margin, strategy, distance, reduction):
        inf = float("inf")
        d, unit = _distances(x, distance)
        d_neg, pos = _masks(labels, scales, d)
        # d(a,n) < d(a,p) + margin, with the bound rounded as the sorted path and the
        # miner round it (its sign is exact); -inf where (a, p, n) is no triplet
        d_an = d_neg[:, None, :]
        diff = torch.where(pos, d + margin, -inf)[:, :, None] - d_an
        bound = None
        if strategy == "semihard" or (strategy == "hard" and margin > 0):
            # semihard: d(a,p) < d(a,n); hard: d(a,n) <= d(a,p), where d(a,n) < d(a,p) +
            # margin already holds. Both matter only where diff is finite: no masking
            d_ap = d[:, :, None]
            bound = d_an > d_ap if strategy == "semihard" else d_an <= d_ap
        count = None
        if reduction == "mean":  # the selected triplets, loss-carrying or not
            count = diff >= 0
            count = (count if bound is None else count & bound).sum(dtype=x.dtype)
        terms = diff.relu_() if bound is None else diff.relu_().mul_(bound)
        carrying = terms > 0
        k_pos = carrying.sum(2, dtype=x.dtype)
        coef = k_pos - carrying.sum(1, dtype=x.dtype)  # supports: positives, negatives
        if reduction == "mean_nonzero":
            count = k_pos.sum()
        return _finish(ctx, terms.sum(), count, x, _weights(coef, d, distance), distance, unit)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, 6)


class _BatchHard(torch.autograd.Function):
    """Per anchor the farthest positive and the closest negative, chosen as the sorted
    path chooses (euclidean: on the float64 distances; ties to the smaller index), the
    loss on the rounded distances."""

    @staticmethod
    def forward(ctx, x, labels, scales, margin, distance, reduction):
        d64, unit = _distances(x, distance, rounded=False)
        d_neg, pos = _masks(labels, scales, d64)
        # one max over [farthest positive, closest negative negated]
        picked, picks = torch.stack([torch.where(pos, d64, -float("inf")), -d_neg], 1).max(2)
        picked = picked if picked.dtype == x.dtype else picked.to(x.dtype)
        # d_ap - d_an + margin; rows without a positive or a negative hold -inf: 0
        terms = picked.sum(1, keepdim=True) + margin
        count = None
        if reduction == "mean":  # anchors with both a positive and a negative
            count = (terms > -float("inf")).sum()
        terms = terms.relu_()
        carrying = terms.sign()
        if reduction == "mean_nonzero":
            count = carrying.sum()
        # d total / d d(a,p*) = +carrying, / d d(a,n*) = -carrying: [c, -c] / [d, -d]
        signs = (
            torch.cat([carrying, -carrying], 1)
            if distance != "l2"
            else (torch.nan_to_num(carrying / picked, nan=0.0, posinf=0.0, neginf=0.0))
        )
        weights = torch.zeros_like(d64, dtype=x.dtype).scatter_(1, picks, signs)
        return _finish(ctx, terms.sum(), count, x, weights, distance, unit)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, 5)


class _Contrastive(torch.autograd.Function):
    """``0.5 * sum(g^2)`` with ``g`` the gradient w.r.t. the distances: ``d`` at
    positives, ``-relu(margin - d)`` at negatives, 0 elsewhere; symmetric."""

    @staticmethod
    def forward(ctx, x, labels, scales, margin, reduction):
        d = direct_distances(x, False)
        eq = labels[:, None] == labels
        # g = d - t: t = max(d, margin) at negatives (g = -relu(margin - d), rounded as
        # d - margin), d at pairs that are neither, 0 at positives
        t = torch.where(eq, d, d.clamp_min(margin))
        pos = eq.fill_diagonal_(False) if scales is None else eq & (scales[:, None] != scales)
        t = torch.where(pos, 0.0, t)
        # sum(g^2) / 2 in one op: the Huber loss is quadratic below its delta (the aten
        # op itself: F.huber_loss adds a broadcast_tensors call; 2 = sum)
        total = torch.ops.aten.huber_loss(d, t, 2, float("inf"))
        g = d - t
        if reduction == "sum":
            count = None
        elif reduction == "mean_nonzero":
            count = g.count_nonzero()
        elif scales is None:
            count = len(x) * (len(x) - 1)  # every ordered pair is a positive or a negative
        else:  # the positives and the negatives
            count = torch.where(eq, pos, True).sum(dtype=x.dtype)
        return _finish(ctx, total, count, x, _weights(g, d, "l2"), "l2", symmetric=True)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, 4)


def small_triplet_loss(
    x: Tensor,
    labels: Tensor,
    scales: Tensor | None,
    margin: float,
    strategy: str,
    distance: str,
    reduction: str,
) -> Tensor:
    """The fused triplet loss of ``x`` [B, D] against itself; ``scales``: the cross-scale
    rule's magnifications, or None; ``strategy``: ``"batch_hard"`` or a window;
    ``distance``: ``"l2"``, ``"squared_l2"`` or ``"cosine"``."""
    if strategy == "batch_hard":
        return _BatchHard.apply(x, labels, scales, margin, distance, reduction)
    return _Triplets.apply(x, labels, scales, margin, strategy, distance, reduction)


def small_contrastive_loss(
    x: Tensor, labels: Tensor, scales: Tensor | None, margin: float, reduction: str
) -> Tensor:
    """The contrastive loss over every pair of ``x`` [B, D] (``scales`` as above)."""
    return _Contrastive.apply(x, labels, scales, margin, reduction)
