"""The SMSE pair (contrastive) loss, over every pair or a mined pair tuple."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice
from ._common import (
    PAIR_REDUCTIONS,
    acc_dtype,
    block_masks,
    check_indices,
    full_precision,
    metric_inputs,
    reduce_terms,
    with_gradient,
)
from ._small_batch import small_contrastive_loss, uses_small_batch
from .distances import gathered_distances, pairwise_distances, self_distances

__all__ = ["contrastive_loss"]


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
        indices_tuple: None for every pair of the batch (O(B^2) memory), a pair
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
        if indices_tuple is None and (emb.shape[0] == 0 or ref.shape[0] == 0):
            return (emb.sum() + ref.sum()) * 0.0  # no pair: the connected zero
        if indices_tuple is None and uses_small_batch(emb, same):
            cross = scales if cross_scale else None
            return small_contrastive_loss(emb, labels, cross, margin, reduction)
        if indices_tuple is None:
            pos, neg = block_masks(
                labels, ref_labels, scales if cross_scale else None, ref_scales, same, 0, len(emb)
            )
            # pos and neg are symmetric within one batch, and so is the gradient
            dist = self_distances(emb, True) if same else pairwise_distances(emb, ref)
            with torch.no_grad():
                # d/dd of 0.5 d^2 is d; of 0.5 relu(m - d)^2 it is -relu(m - d). The loss
                # is then 0.5 * sum(grad^2) (pos and neg are disjoint).
                d = dist.detach()
                grad_d = torch.where(neg, -torch.relu(margin - d), d).masked_fill(~(pos | neg), 0)
                total = 0.5 * grad_d.square().sum(dtype=acc_dtype(d))
                n_sel = pos.sum() + neg.sum()
                n_nz = (grad_d != 0).sum() if reduction == "mean_nonzero" else n_sel
            return reduce_terms(with_gradient(total, dist, grad_d), n_sel, n_nz, reduction)

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
