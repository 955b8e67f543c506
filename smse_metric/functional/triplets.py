"""The triplet margin loss, fused (never materialising triplets) or on mined triplets,
and the selection windows shared with [`TripletMiner`][smse_metric.TripletMiner]."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, resolve_distance
from ._common import (
    FUSED_TRIPLETS,
    TRIPLET_REDUCTIONS,
    TRIPLET_STRATEGIES,
    acc_dtype,
    block_masks,
    check_indices,
    full_precision,
    hardest,
    hardest_float32,
    metric_inputs,
    reduce_terms,
    row_blocks,
)
from ._small_batch import small_triplet_loss, uses_small_batch
from .distances import gathered_distances, pairwise_distances

__all__ = ["triplet_margin_loss", "triplet_windows"]


def _count(sorted_rows: Tensor, values: Tensor, right: bool) -> Tensor:
    """Per row, how many sorted entries are <= (right) or < (left) each value."""
    return torch.searchsorted(sorted_rows, values, right=right, out_int32=True)


def _bounds(
    d_ap: Tensor, margin: float, strategy: str
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The selection rule, once: (a, p, n) is selected iff ``lower < d(a,n) <= upper``
    (None: unbounded), with both bounds non-decreasing in ``d_ap``; also returns
    ``thresh = d_ap + margin``, which an upper bound may be (the same tensor)."""
    thresh = d_ap + margin
    if strategy == "all":
        return None, thresh, thresh
    if strategy == "hard":
        return None, (d_ap if margin > 0 else thresh), thresh
    if strategy == "semihard":
        return d_ap, thresh, thresh
    if strategy == "easy":
        return thresh, None, thresh
    raise ValueError(f"strategy must be one of {TRIPLET_STRATEGIES}, got {strategy!r}")


def triplet_windows(
    sorted_neg: Tensor, d_ap: Tensor, margin: float, strategy: str
) -> tuple[Tensor, Tensor]:
    """Which negatives each (anchor, positive) selects, as a window of sorted negatives.

    For anchor ``a`` the negative distances sorted ascending are ``sorted_neg[a]``
    (non-negatives padded with ``+inf``). The triplets (a, p, n) that a strategy
    selects, with ``t = d(a,n) - d(a,p)`` as in pytorch-metric-learning, are

    - ``"all"``: ``t <= margin``, i.e. every triplet with a non-negative loss;
    - ``"hard"``: ``t <= min(margin, 0)``;
    - ``"semihard"``: ``0 < t <= margin``;
    - ``"easy"``: ``t > margin``;

    and, since the negatives are sorted, they are the contiguous window
    ``[lo, hi)`` of ``sorted_neg[a]``. The fused loss selects by the same rule.

    Args:
        sorted_neg: [B, R] ascending rows, ``+inf`` where not a negative.
        d_ap: [B, R] anchor-positive distances (only entries at positives matter).
        margin: the triplet margin.
        strategy: ``"all"``, ``"semihard"``, ``"hard"`` or ``"easy"``, as in PML's
            ``TripletMarginMiner``.

    Returns:
        ``(lo, hi)``, two [B, R] int32 tensors.

    Examples:
        >>> neg = torch.tensor([[0.1, 0.5, 0.9]])  # anchor 0's negative distances, sorted
        >>> d_ap = torch.tensor([[0.4, 0.0, 0.0]])  # column 0 is its positive, at 0.4
        >>> lo, hi = triplet_windows(neg, d_ap, margin=0.2, strategy="semihard")
        >>> lo[0, 0].item(), hi[0, 0].item()  # 0.4 < d(a, n) <= 0.6: only 0.5
        (1, 2)
    """
    lower, upper, _ = _bounds(d_ap, margin, strategy)
    if lower is None:
        lo = torch.zeros_like(d_ap, dtype=torch.int32)
    else:
        lo = _count(sorted_neg, lower, True)
    if upper is None:
        hi = torch.isfinite(sorted_neg).sum(1, keepdim=True, dtype=torch.int32).expand_as(d_ap)
    else:
        hi = _count(sorted_neg, upper, True)
    return lo, torch.maximum(lo, hi)


#: the integer type whose order is that of a dtype's non-negative floats' bit patterns
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _one_sort(d: Tensor, pos: Tensor, neg: Tensor, n_pos: Tensor):
    """Both sides of a block from one sort, for non-negative distances: non-negative
    floats order as their bit patterns, so a row's positives keyed with the sign bit set
    sort before its negatives, and the non-members (the largest key) last. Returns
    ``(count_neg, sorted_pos)``: ``count_neg(values, right)`` counts a row's negatives
    ``<`` (``<=``) each value, as ``searchsorted`` on the sorted negatives would, and
    ``sorted_pos`` holds the row's positives ascending, then ``+inf``."""
    ity = _BITS[d.dtype]
    info = torch.iinfo(ity)
    bits = d.view(ity).clamp_min(0)  # -0.0 (the sign bit alone) as +0.0
    keys = torch.where(pos, bits + info.min, torch.where(neg, bits, info.max))
    keys = keys.sort(dim=1).values
    del bits
    place = torch.arange(keys.shape[1], device=d.device, dtype=torch.int32)
    sorted_pos = torch.where(place < n_pos, keys.bitwise_and(info.max).view(d.dtype), torch.inf)

    def count_neg(values: Tensor, right: bool) -> Tensor:
        # a negative value admits no negative (-1 lies between the two segments)
        q = torch.where(values < 0, -1, values.view(ity).clamp_min(0))
        return torch.searchsorted(keys, q, right=right, out_int32=True) - n_pos

    return count_neg, sorted_pos


def _total(counts: Tensor) -> Tensor:
    """The int64 sum of a block's per-pair triplet counts, by rows in their own type
    first: a whole-block sum casts every int32 entry to int64 (100x slower on the
    CPU). A row counts at most n_pos * n_neg <= (cols / 2)^2 triplets: within int32
    below 2^16 columns."""
    if counts.dtype == torch.int32 and counts.shape[1] >= 1 << 16:
        return counts.sum()
    return counts.sum(1, dtype=counts.dtype).sum()


def _second_bound(strategy: str, margin: float) -> bool:
    """Whether `_merged` keys a second bound per positive (twice the columns)."""
    return strategy == "semihard" or (strategy == "hard" and margin > 0)


def _merged(
    d: Tensor, pos: Tensor, neg: Tensor, margin: float, strategy: str
) -> tuple[Tensor, Tensor]:
    """`_triplet_block`'s ``(coef, loss-carrying triplets)`` for ``"all"``,
    ``"semihard"`` and ``"hard"`` on non-negative distances, from one sort per row of
    the negatives and the positives' bounds together, instead of binary searches.

    Keys are bit patterns (as in `_one_sort`) times two, plus one for a negative, so a
    bound sorts before a negative of the same value: the negatives before a bound at
    ``t`` are those ``< t``. A positive's upper bound is ``d_ap + margin`` (the
    loss-carrying end); where the selection also compares ``d_an`` with ``d_ap``
    (semihard: ``d_an > d_ap``; hard with a positive margin: ``d_an <= d_ap``) a
    second bound sits one bit pattern above ``d_ap``, so the negatives before it are
    those ``<= d_ap``. A positive's count is then a running count of negatives, and a
    negative's (the positives whose window holds it) one of the bounds after it,
    scattered back: no binary search at all."""
    ity = _BITS[d.dtype]
    info = torch.iinfo(ity)
    cols = d.shape[1]
    second = _second_bound(strategy, margin)
    # (bits - 2^(n-2)) * 2 + is_negative spans the integer type exactly: no overflow; a
    # negative threshold (negative margin) keys as +0.0, which admits no negative either
    bits = torch.where(pos, (d + margin).view(ity), d.view(ity)).clamp_min_(0)
    keys = bits.sub_(1 << (info.bits - 2)).mul_(2).add_(neg)
    keys = keys.masked_fill_(~(pos | neg), info.max)  # non-members last
    if second:  # one bit pattern above d_ap (NaN's largest pattern stays in range)
        at = d.view(ity).clamp(0, info.max - 1).add_(1).sub_(1 << (info.bits - 2)).mul_(2)
        keys = torch.cat([keys, at.masked_fill_(~pos, info.max)], 1)
    n_pos = pos.sum(1, keepdim=True, dtype=ity)
    keys, order = keys.sort(dim=1)
    # 1 at a negative, 0 at a bound, kept as integers: a bool would be cast back for
    # the cumsum and the product below (a pass each); non-members (odd) sort last
    is_neg = keys.bitwise_and_(1)
    del keys
    # in place where it can be: [B, B] (two of them with a second bound) temporaries
    # are what this path holds
    counts = is_neg.cumsum(1, dtype=ity)  # at a bound: the negatives before it
    place = torch.arange(counts.shape[1], device=d.device, dtype=ity)
    if not second:  # at a negative: the positives after it, n_pos - (place + 1 - counts)
        counts = counts.add_(torch.sub(n_pos - 1, place).mul_(is_neg))
    else:
        is_at = order >= cols
        # at a negative: the upper bounds after it, n_pos - (place + 1 - counts - ats
        # so far), and the second bounds after it, n_pos - ats so far
        at_seen = is_at.cumsum(1, dtype=ity)
        upper_after = (n_pos - 1 - place).add_(counts).add_(at_seen)
        at_after = n_pos - at_seen
        if strategy == "semihard":  # d_ap < d_an < d_ap + margin
            window = upper_after.sub_(at_after).clamp_min_(0)
        else:  # hard: d_an <= d_ap and d_an < d_ap + margin
            window = torch.minimum(upper_after, at_after)
        counts = torch.where(is_neg.bool(), window, counts)
        del is_at, at_seen, upper_after, at_after, window
    del is_neg
    counts = torch.empty_like(counts).scatter_(1, order, counts)
    del order
    k_pos = counts[:, :cols]
    if second:  # negatives in the window: below the upper bound, above the second one
        at_count = counts[:, cols:]
        if strategy == "semihard":
            k_pos = (k_pos - at_count).clamp_min_(0)
        else:
            k_pos = torch.minimum(k_pos, at_count)
    k_pos = torch.where(pos, k_pos, 0)
    coef = torch.where(neg, counts[:, :cols].neg(), k_pos).to(d.dtype)
    return coef, _total(k_pos)


def _triplet_block(
    d: Tensor, pos: Tensor, neg: Tensor, margin: float, strategy: str, need_sel: bool
):
    """Counts for one block of anchors: (coef, loss-carrying triplets, selected triplets).

    Only loss-carrying triplets (``d_an < d_ap + margin``) inside the selection of
    `_bounds` matter for the value and gradient; ``k_pos[a, p]`` counts them per
    positive (a prefix of the sorted negatives minus another), ``w[a, n]`` per
    negative (a suffix of the sorted positives minus another: the bounds grow with
    ``d_ap``). Both sides compare the same rounded bounds, so the counts agree. Every
    distance here is non-negative (cosine's are ``|x/|x| - y/|y||^2 / 2``), so
    both sides come from one sort (`_one_sort`, `_merged`).
    """
    if not need_sel:
        coef, k_total = _merged(d, pos, neg, margin, strategy)
        return coef, k_total, None
    n_pos = pos.sum(1, keepdim=True, dtype=torch.int32)
    count_neg, sorted_pos = _one_sort(d, pos, neg, n_pos)
    lower, upper, thresh = _bounds(d, margin, strategy)
    carrying = count_neg(thresh, False)  # negatives with d_an < d_ap + margin
    # below an upper bound that is the threshold itself, every carrying one is selected
    k_hi = carrying
    if upper is not None and upper is not thresh:
        k_hi = torch.minimum(count_neg(upper, True), carrying)
    k_lo = None if lower is None else torch.minimum(count_neg(lower, True), carrying)
    k_pos = k_hi if k_lo is None else (k_hi - k_lo).clamp_min_(0)
    n_sel = None
    if need_sel:  # the windows of `triplet_windows`, counted on the same sort
        lo = 0 if lower is None else count_neg(lower, True)
        n_neg = neg.sum(1, keepdim=True, dtype=torch.int32)
        hi = n_neg if upper is None else count_neg(upper, True)
        n_sel = _total(torch.where(pos, (hi - lo).clamp_min(0), 0))
    del count_neg, carrying, k_hi, k_lo
    p_lower, p_upper, p_thresh = _bounds(sorted_pos, margin, strategy)  # still sorted
    w = n_pos - _count(p_thresh, d, True)  # positives with d_ap + margin > d_an
    if p_upper is not None and p_upper is not p_thresh:
        w = torch.minimum(w, n_pos - _count(p_upper, d, False))  # and upper >= d_an
    if p_lower is not None:  # minus those whose lower bound already reaches d_an
        w = w - torch.minimum(n_pos - _count(p_lower, d, False), w)
    k_pos = torch.where(pos, k_pos, 0)
    coef = torch.where(neg, w.neg(), k_pos).to(d.dtype)
    return coef, _total(k_pos), n_sel


def _fused_triplet_loss(
    dist, labels, ref_labels, scales, ref_scales, same, margin, strategy, reduction
):
    """Sum of the selected triplets' losses as a linear form in the distances.

    Within the selection a triplet contributes ``d_ap + margin - d_an`` when that
    is positive, so the total is ``sum(coef * dist) + margin * K``: ``coef[a, p]``
    counts the loss-carrying triplets through (a, p), ``-coef[a, n]`` those through
    (a, n), ``K`` all of them. The counts are piecewise constant in the distances,
    so this has the exact value and the exact gradient while autograd keeps only
    ``coef``: no [B, B, B] tensor, no saved sort indices. Anchors go in blocks of
    at most 2^24 matrix entries to bound the sort buffers (one block up to B=4096).
    """
    need_sel = reduction == "mean"
    acc = acc_dtype(dist)
    with torch.no_grad():
        coef = torch.empty_like(dist)
        k_total = torch.zeros((), dtype=torch.int64, device=dist.device)
        n_sel = torch.zeros((), dtype=torch.int64, device=dist.device) if need_sel else None
        # sort buffers of at most BLOCK_ENTRIES keys, a second bound's included
        wide = not need_sel and _second_bound(strategy, margin)
        for start, stop in row_blocks(dist.shape[0], dist.shape[1] * (2 if wide else 1)):
            d = dist[start:stop].detach()
            pos, neg = block_masks(labels, ref_labels, scales, ref_scales, same, start, stop)
            c, k, n = _triplet_block(d, pos, neg, margin, strategy, need_sel)
            coef[start:stop] = c
            k_total += k
            if need_sel:
                n_sel += n
    value = ((coef * dist).sum(dtype=acc) + margin * k_total.to(acc)).to(dist.dtype)
    return reduce_terms(value, n_sel if need_sel else k_total, k_total, reduction)


def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 1.0,
    squared: bool | None = None,
    triplets: str = "all",
    reduction: str = "mean_nonzero",
    indices_tuple: tuple[Tensor, Tensor, Tensor] | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    scales: Tensor | None = None,
    ref_scales: Tensor | None = None,
    cross_scale: bool = False,
    distance: str | None = None,
) -> Tensor:
    """Triplet margin loss ``relu(d(a,p) - d(a,n) + margin)``, fused or on mined triplets.

    Without ``indices_tuple`` the triplets are never materialised. ``triplets``:

    - ``"all"``, ``"semihard"``, ``"hard"``: the selections of
      pytorch-metric-learning's ``TripletMarginMiner`` with this margin (see
      `triplet_windows`), computed per anchor from one sort of its negatives'
      distances and its positives' window bounds together, and prefix counts (with
      ``reduction="mean"``: a sort and ``searchsorted``): O(B^2 log B) time, O(B^2)
      memory;
    - ``"batch_hard"``: per anchor, the farthest positive and the closest negative.

    Args:
        embeddings: [B, D] embeddings.
        labels: [B] integer labels.
        margin: the margin.
        squared: the old spelling of ``distance="squared_l2"`` / ``"l2"``; deprecated,
            warns.
        triplets: without ``indices_tuple``, the selection: ``"all"``, ``"semihard"``,
            ``"hard"`` or ``"batch_hard"`` (above).
        reduction: ``"mean_nonzero"`` (mean over triplets with positive loss, PML's
            default), ``"mean"`` (over all selected triplets) or ``"sum"``.
        indices_tuple: ``(a, p, n)`` from any miner; exactly those triplets are used.
        ref_emb: optional [R, D] reference set (as in PML).
        ref_labels: [R] labels of ``ref_emb``.
        scales: [B] magnification ids of the embeddings.
        ref_scales: [R] magnification ids of ``ref_emb``.
        cross_scale: only positives at a different scale from the anchor count.
        distance: ``"l2"`` (default), ``"squared_l2"`` (the SMSE form) or ``"cosine"``:
            the cosine similarity with PML's margin convention,
            ``relu(s(a,n) - s(a,p) + margin)`` (computed as ``1 - s``, which gives the same
            differences and selections).

    Returns:
        A scalar; a graph-connected zero when no triplet applies.

    Examples:
        >>> emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
        >>> labels = torch.arange(16) % 3
        >>> triplet_margin_loss(emb, labels, margin=0.2, triplets="semihard").backward()
    """
    check_choice("reduction", reduction, TRIPLET_REDUCTIONS)
    check_choice("triplets", triplets, FUSED_TRIPLETS)
    distance = resolve_distance(distance, "l2", squared=squared)
    x = metric_inputs(embeddings, labels, ref_emb, ref_labels, scales, ref_scales, cross_scale)
    emb, ref, same, labels, ref_labels = x.emb, x.ref, x.same, x.labels, x.ref_labels
    scales, ref_scales = x.scales, x.ref_scales
    with full_precision(embeddings.device):
        if indices_tuple is not None:
            if isinstance(indices_tuple, tuple | list) and len(indices_tuple) == 4:
                raise ValueError(
                    "indices_tuple holds pairs (a1, p, a2, n); TripletMarginLoss needs "
                    "triplets (a, p, n), e.g. from TripletMiner"
                )
            a, p, n = check_indices(
                indices_tuple, (emb.shape[0], ref.shape[0], ref.shape[0]), emb.device
            )
            if not a.shape == p.shape == n.shape:
                raise ValueError("indices_tuple: a, p and n must have equal lengths")
            d_ap, d_an = gathered_distances(emb, ref, same, [(a, p), (a, n)], distance)
            terms = torch.relu(d_ap - d_an + margin)
            if cross_scale:
                keep = scales[a] != ref_scales[p]
                terms = torch.where(keep, terms, 0)
                n_sel = keep.sum()
            else:
                n_sel = torch.full((), len(a), device=emb.device)
            return reduce_terms(terms.sum(), n_sel, (terms > 0).sum(), reduction)

        scales = scales if cross_scale else None
        if emb.shape[0] == 0 or ref.shape[0] == 0:  # no triplet: the connected zero
            return (emb.sum() + ref.sum()) * 0.0
        if uses_small_batch(emb, same, cubic=triplets != "batch_hard"):
            return small_triplet_loss(emb, labels, scales, margin, triplets, distance, reduction)
        if triplets == "batch_hard":
            return _batch_hard_loss(
                emb, ref, labels, ref_labels, scales, ref_scales, same, margin, distance, reduction
            )
        dist = pairwise_distances(emb, None if same else ref, distance)
        return _fused_triplet_loss(
            dist, labels, ref_labels, scales, ref_scales, same, margin, triplets, reduction
        )


def _batch_hard_loss(
    emb, ref, labels, ref_labels, scales, ref_scales, same, margin, distance, reduction
):
    """Per anchor with a positive and a negative: relu(farthest positive - closest
    negative + margin). The choice needs every distance, the gradient only 2B of
    them: choose without autograd, then differentiate just the chosen pairs. The choice
    compares squared distances: the same order as the distances, without the roots."""
    choose_by = "cosine" if distance == "cosine" else "squared_l2"
    picks, chosen = [], []  # chosen: cosine's values in the matrix that chose them
    with torch.no_grad():
        # blocks of 2^22 entries keep the temporaries in cache; the choice is per row
        eager_cpu = emb.is_cpu and not torch.compiler.is_compiling()
        float32_first = eager_cpu and choose_by == "squared_l2" and emb.dtype == torch.float32
        for start, stop in row_blocks(len(emb), len(ref), 1 << 22):
            e = emb[start:stop].detach()
            pos, neg = block_masks(labels, ref_labels, scales, ref_scales, same, start, stop)
            # float32 first on the CPU: the float64 product would double the cost
            pick = hardest_float32(e, ref.detach(), pos, neg) if float32_first else None
            if pick is None:
                d = pairwise_distances(e, ref.detach(), choose_by)
                far = torch.where(pos, d, -torch.inf) if distance == "cosine" else None
                pick = hardest(d, pos, neg)  # d is overwritten off the negatives
                if far is not None:
                    chosen.append([far.gather(1, pick[1][:, None]), d.gather(1, pick[2][:, None])])
            picks.append(pick)
        valid, pos_idx, neg_idx = (torch.cat(t) for t in zip(*picks, strict=True))
    anchors = torch.arange(len(emb), device=emb.device)
    d_ap, d_an = gathered_distances(
        emb, ref, same, [(anchors, pos_idx), (anchors, neg_idx)], distance
    )
    if chosen:
        # the values of the matrix that chose, as the launch-light path and the miners
        # see them: gathered rows may differ by an ulp, which decides a term that ties
        # at 0 ("mean_nonzero" would count it); the gradient stays the gathered one's
        v_ap, v_an = (torch.cat(t).squeeze(1).to(d_ap.dtype) for t in zip(*chosen, strict=True))
        d_ap = d_ap + (v_ap - d_ap).detach()
        d_an = d_an + (v_an - d_an).detach()
    terms = torch.where(valid, torch.relu(d_ap - d_an + margin), 0)
    return reduce_terms(terms.sum(), valid.sum(), (terms > 0).sum(), reduction)
