"""The SMSE pair (contrastive) loss, over every pair or a mined pair tuple."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice
from ._common import (
    BLOCK_ENTRIES,
    PAIR_REDUCTIONS,
    acc_dtype,
    block_masks,
    check_indices,
    full_precision,
    metric_inputs,
    reduce_terms,
    row_blocks,
    with_gradient,
)
from ._small_batch import small_contrastive_loss, uses_small_batch
from .distances import block_distances, gathered_distances

__all__ = ["contrastive_loss"]

#: A block of pairs on the CPU: (entries, at least this many anchors). Blocks of a few
#: MiB reuse the allocator's memory and stay in cache (3.9x faster than one [B, B]
#: block at B = 4096); under 128 anchors the products lose more than that gains
#: (64 anchors: 1.65x slower at B = 8192). Measured on the 2-core CPU.
CPU_BLOCK = (1 << 19, 128)


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 1.0,
    reduction: str = "mean",
    indices_tuple: tuple[Tensor, ...] | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    scales: Tensor | None = None,
    ref_scales: Tensor | None = None,
    cross_scale: bool = False,
) -> Tensor:
    """SMSE pair loss ``0.5 * [y d^2 + (1 - y) relu(margin - d)^2]``, d euclidean.

    Args:
        embeddings: [B, D] embeddings.
        labels: [B] integer labels.
        margin: negatives closer than this are penalised.
        reduction: ``"mean"`` over all selected positive and negative pairs,
            ``"sum"``, or ``"mean_nonzero"`` over pairs with a positive loss.
        indices_tuple: None for every pair of the batch (in blocks of anchors: the
            backward keeps [B, D] gradients, not a [B, B] matrix), a pair
            tuple ``(a1, p, a2, n)``, or a triplet tuple ``(a, p, n)`` read as
            pairs ``(a, p, a, n)``, from any miner (ours or PML's).
        ref_emb: optional [R, D] reference set that pairs point into (as in PML).
        ref_labels: [R] labels of ``ref_emb``.
        scales: [B] magnification ids; with ``cross_scale`` only positives at
            different scales count.
        ref_scales: [R] magnification ids of ``ref_emb``.
        cross_scale: keep only positive pairs whose scales differ (needs ``scales``).

    Returns:
        A scalar. With no valid pair it is a zero connected to the graph.

    Examples:
        >>> emb = torch.randn(6, 3, requires_grad=True)
        >>> contrastive_loss(emb, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    """
    check_choice("reduction", reduction, PAIR_REDUCTIONS)
    x = metric_inputs(embeddings, labels, ref_emb, ref_labels, scales, ref_scales, cross_scale)
    emb, ref, same, labels, ref_labels = x.emb, x.ref, x.same, x.labels, x.ref_labels
    scales, ref_scales = x.scales, x.ref_scales
    with full_precision(embeddings.device):
        if indices_tuple is None:
            if emb.shape[0] == 0 or ref.shape[0] == 0:
                return (emb.sum() + ref.sum()) * 0.0  # no pair: the connected zero
            cross = scales if cross_scale else None
            if uses_small_batch(emb, same):
                return small_contrastive_loss(emb, labels, cross, margin, reduction)
            return _all_pairs(
                emb, ref, same, (labels, ref_labels), (cross, ref_scales), margin, reduction
            )

        if isinstance(indices_tuple, tuple | list) and len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        a1, p, a2, n = check_indices(
            indices_tuple, (emb.shape[0], ref.shape[0], emb.shape[0], ref.shape[0]), emb.device
        )
        if a1.shape != p.shape or a2.shape != n.shape:
            raise ValueError("indices_tuple: a1/p and a2/n must have equal lengths")
        d_pos, d_neg = gathered_distances(emb, ref, same, [(a1, p), (a2, n)], "l2")
        pos_terms = 0.5 * d_pos.square()
        if cross_scale and scales is not None and ref_scales is not None:  # set: checked
            pos_terms = torch.where(scales[a1] != ref_scales[p], pos_terms, 0)
            n_pos = (scales[a1] != ref_scales[p]).sum()
        else:
            n_pos = torch.full((), len(a1), device=emb.device)
        neg_terms = 0.5 * torch.relu(margin - d_neg).square()
        total = pos_terms.sum() + neg_terms.sum()
        n_nz = (pos_terms > 0).sum() + (neg_terms > 0).sum()
        return reduce_terms(total, n_pos + len(n), n_nz, reduction)


def _all_pairs(
    emb: Tensor,
    ref: Tensor,
    same: bool,
    labels: tuple[Tensor, Tensor],
    scales: tuple[Tensor | None, Tensor | None],
    margin: float,
    reduction: str,
) -> Tensor:
    """The loss over every pair, a block of anchors at a time: each block's distances
    give its terms, its counts and, in closed form, its share of the gradients, so no
    [B, R] matrix outlives its block and autograd keeps only the [B, D] gradients.

    With ``w = (dL/dd) / d`` (0 where ``d = 0``, where the euclidean gradient is 0),
    anchor i's gradient is ``sum_j w_ij (x_i - y_j)`` and reference j's ``sum_i w_ij
    (y_j - x_i)``; within one batch ``w`` is symmetric, so a block's rows hold both
    halves of its anchors' gradients: ``2 sum_j w_ij (x_i - x_j)``."""
    acc = acc_dtype(emb)
    x, y = emb.detach(), ref.detach()
    grads = torch.is_grad_enabled()
    gx = torch.zeros_like(x) if grads and emb.requires_grad else None
    gy = torch.zeros_like(y) if grads and not same and ref.requires_grad else None
    total = torch.zeros((), dtype=acc, device=x.device)
    n_sel = n_nz = torch.zeros((), dtype=torch.int64, device=x.device)
    entries = BLOCK_ENTRIES
    if x.device.type == "cpu":
        entries = max(CPU_BLOCK[0], CPU_BLOCK[1] * len(y))
    for start, stop in row_blocks(len(x), len(y), entries):
        d = block_distances(x, y, start, stop)
        pos, neg = block_masks(*labels, *scales, same, start, stop)
        # dL/dd: d for a positive (0.5 d^2), -relu(margin - d) for a negative; the
        # loss is 0.5 * sum(grad_d^2), positives and negatives being disjoint
        grad_d = torch.where(pos, d, (d - margin).clamp_max_(0).masked_fill_(~neg, 0))
        total = total + grad_d.square().sum(dtype=acc)
        n_sel = n_sel + torch.count_nonzero(pos) + torch.count_nonzero(neg)
        if reduction == "mean_nonzero":
            n_nz = n_nz + torch.count_nonzero(grad_d)
        if gx is None and gy is None:
            continue
        w = grad_d.div_(d).masked_fill_(d == 0, 0)
        rows = x[start:stop]
        if gx is not None:
            gx[start:stop] = (rows * w.sum(1, keepdim=True)).sub_(w @ y)
            if same:
                gx[start:stop] *= 2
        if gy is not None:
            gy.add_(y * w.sum(0).unsqueeze(1)).sub_(w.T @ rows)
    if reduction != "mean_nonzero":
        n_nz = n_sel
    pairs = [(t, g) for t, g in ((emb, gx), (ref, gy)) if g is not None]
    return reduce_terms(with_gradient(0.5 * total, emb.dtype, pairs), n_sel, n_nz, reduction)
