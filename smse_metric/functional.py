"""Pure tensor math for metric learning: distances, label masks and fused losses.

Everything here is a stateless function of tensors. Nothing synchronises with
the host on the hot path, nothing loops over the batch in Python, and every
function works on any device and dtype. Half-precision inputs (and autocast
regions) are computed in float32, so losses accumulate in float32 or better.

Shapes: ``B`` embeddings of dimension ``D``; an optional reference set of
``R`` embeddings (``ref_emb``), otherwise the batch is its own reference
(``R = B``) and an embedding is never its own positive.

Examples:
    >>> import torch
    >>> from smse_metric import functional as smf
    >>> emb = torch.randn(8, 4, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    >>> loss = smf.triplet_margin_loss(emb, labels, margin=0.5, triplets="semihard")
    >>> loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DISTANCE_METRICS",
    "TRIPLET_STRATEGIES",
    "contrastive_loss",
    "cross_scale_mask",
    "focal_loss",
    "label_masks",
    "pairwise_distances",
    "reinforced_focal_loss",
    "triplet_margin_loss",
    "triplet_windows",
]

DISTANCE_METRICS = ("euclidean", "squared_euclidean", "cosine")
#: Triplet selections shared by the fused loss and [`TripletMiner`][smse_metric.TripletMiner].
TRIPLET_STRATEGIES = ("all", "semihard", "hard", "easy", "batch_hard")
FUSED_TRIPLETS = ("all", "semihard", "hard", "batch_hard")
PAIR_REDUCTIONS = ("mean", "sum", "mean_nonzero")
TRIPLET_REDUCTIONS = ("mean_nonzero", "mean", "sum")
CLASS_REDUCTIONS = ("mean", "sum", "none")

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave any autocast region: distances and sums must not run in half precision."""
    # A fixed list rather than torch.amp.is_autocast_available: dynamo cannot trace that.
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _HALF else x


def _acc_dtype(x: Tensor) -> torch.dtype:
    # float64 accumulation of many signed terms; MPS has no float64.
    return torch.float32 if x.device.type == "mps" else torch.float64


def _checking_values(t: Tensor) -> bool:
    """Value checks (ranges) only where they cost no device sync and no graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_float_matrix(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_int_vector(name: str, t: object, length: int, other: str, device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} elements but {other} has {length} rows")
    return t.to(device, non_blocking=True)


def _prepare_metric_inputs(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    scales: Tensor | None,
    ref_scales: Tensor | None,
    cross_scale: bool,
):
    """Validate and normalise the common (embeddings, labels, ref, scales) arguments."""
    _check_float_matrix("embeddings", embeddings)
    dev = embeddings.device
    labels = _check_int_vector("labels", labels, embeddings.shape[0], "embeddings", dev)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is not None:
        _check_float_matrix("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has dimension {ref_emb.shape[1]} but embeddings has {embeddings.shape[1]}"
            )
        ref_labels = _check_int_vector("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", dev)
        ref_emb = ref_emb.to(dev)
    if cross_scale and scales is None:
        raise ValueError("cross_scale=True needs scales (the magnification of each embedding)")
    if scales is not None:
        scales = _check_int_vector("scales", scales, embeddings.shape[0], "embeddings", dev)
        if ref_emb is not None:
            if cross_scale and ref_scales is None:
                raise ValueError("cross_scale=True with ref_emb needs ref_scales")
            if ref_scales is not None:
                ref_scales = _check_int_vector(
                    "ref_scales", ref_scales, ref_emb.shape[0], "ref_emb", dev
                )
    return labels, ref_emb, ref_labels, scales, ref_scales


# --------------------------------------------------------------------------- distances


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
    _check_float_matrix("x", x)
    _check_choice("metric", metric, DISTANCE_METRICS)
    same = y is None
    if y is None:
        y = x
    else:
        _check_float_matrix("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y has dimension {y.shape[1]} but x has {x.shape[1]}")
    with _full_precision(x.device):
        x, y = _upcast(x), _upcast(y.to(x.device))
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


# --------------------------------------------------------------------------- masks


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
    return _block_masks(labels, labels if same else ref_labels, None, None, same, 0, len(labels))


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


def _block_masks(labels, ref_labels, scales, ref_scales, same, start, stop):
    """(pos, neg) for anchors ``start:stop`` against every reference.

    ``scales`` (None: no cross-scale rule) restricts positives to other scales;
    ``same`` excludes each anchor from its own positives.
    """
    pos = labels[start:stop, None] == ref_labels[None]
    neg = ~pos
    if same:
        # anchor i of the block is reference start + i; a view fill, no index_put sync
        pos.diagonal(offset=start).fill_(False)
    if scales is not None:
        pos &= scales[start:stop, None] != ref_scales[None]
    return pos, neg


def _row_blocks(n_rows: int, n_cols: int, entries: int | None = None) -> list[tuple[int, int]]:
    """Anchor blocks of at most ``entries`` (default _BLOCK_ENTRIES) matrix entries."""
    step = max(1, (entries or _BLOCK_ENTRIES) // max(n_cols, 1))
    return [(i, min(i + step, n_rows)) for i in range(0, max(n_rows, 1), step)]


_BLOCK_ENTRIES = 1 << 24


# --------------------------------------------------------------------------- classification


def _class_inputs(logits: Tensor, target: Tensor, weight: Tensor | None, weight_name: str):
    _check_float_matrix("logits", logits)
    target = _check_int_vector("target", target, logits.shape[0], "logits", logits.device)
    n_classes = logits.shape[1]
    if _checking_values(target) and target.numel() > 0:
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(
                f"target values must lie in [0, {n_classes}) for {n_classes} classes, "
                f"got values in [{lo}, {hi}]"
            )
    if weight is not None:
        if not isinstance(weight, Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.ndim != 1 or weight.shape[0] != n_classes:
            raise ValueError(
                f"{weight_name} must have one value per class ({n_classes}), "
                f"got shape {tuple(weight.shape)}"
            )
        weight = weight.to(logits.device)
    return target, weight


def _reduce_per_sample(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def reinforced_focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 2.0,
    gamma: float = 1.5,
    beta: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
    eps: float = 1e-7,
) -> Tensor:
    """Reinforced focal loss (SMSE): ``L_i = beta[y_i] * alpha * (1 - p_i) ** gamma``.

    ``p_i = softmax(logits_i)[y_i]``. Bounded by ``alpha * beta[y]``, so a
    mislabeled image cannot dominate; for ``gamma > 1`` easy samples get a
    vanishing gradient. Computed in float32 under autocast; ``1 - p`` is
    clamped to ``eps`` so ``gamma < 1`` keeps finite gradients.

    Args:
        logits: [N, C] unnormalised scores.
        target: [N] class indices in ``[0, C)``.
        alpha: overall scale, > 0.
        gamma: focusing exponent, >= 0.
        beta: None (ones) or [C] per-class weights.
        reduction: ``"mean"`` (plain mean over samples), ``"sum"`` or ``"none"`` ([N]).
        eps: ``1 - p`` is clamped to at least this, so ``gamma < 1`` keeps finite gradients.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> reinforced_focal_loss(logits, torch.tensor([0, 0]), alpha=1, gamma=1).shape
        torch.Size([])
    """
    _check_choice("reduction", reduction, CLASS_REDUCTIONS)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    target, beta = _class_inputs(logits, target, beta, "beta")
    with _full_precision(logits.device):
        log_p = torch.log_softmax(_upcast(logits), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        one_minus_p = (-torch.expm1(log_p)).clamp_min(eps)
        loss = alpha * one_minus_p.pow(gamma)
        if beta is not None:
            loss = loss * beta.to(loss.dtype)[target]
        return _reduce_per_sample(loss, reduction)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Classic focal loss (Lin et al. 2017): ``-w[y] (1 - p_y) ** gamma log p_y``.

    With ``gamma=0`` and no ``weight`` it equals cross-entropy. ``"mean"`` is a
    plain mean over samples.

    Args:
        logits: [N, C] unnormalised scores.
        target: [N] class indices in ``[0, C)``.
        gamma: focusing exponent, >= 0.
        weight: None (ones) or [C] per-class weights.
        reduction: ``"mean"`` (plain mean over samples), ``"sum"`` or ``"none"`` ([N]).

    Examples:
        >>> focal_loss(torch.zeros(2, 3), torch.tensor([0, 2]), gamma=0.0)
        tensor(1.0986)
    """
    _check_choice("reduction", reduction, CLASS_REDUCTIONS)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    target, weight = _class_inputs(logits, target, weight, "weight")
    with _full_precision(logits.device):
        log_p = torch.log_softmax(_upcast(logits), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -log_p
        if gamma != 0:
            loss = loss * (-torch.expm1(log_p)).clamp_min(0).pow(gamma)
        if weight is not None:
            loss = loss * weight.to(loss.dtype)[target]
        return _reduce_per_sample(loss, reduction)


# --------------------------------------------------------------------------- pair loss


def _with_gradient(value: Tensor, dist: Tensor, grad_dist: Tensor) -> Tensor:
    """``value`` in the forward pass, with gradient ``grad_dist`` w.r.t. ``dist``.

    The fused losses know both in closed form. A linear surrogate carries the
    gradient (``sum(grad_dist * dist)`` minus its own value), so autograd keeps one
    [B, R] matrix instead of every elementwise intermediate; unlike a custom
    autograd.Function it traces correctly under every torch.compile version.
    """
    lin = (grad_dist * dist).sum(dtype=value.dtype)
    return (lin + (value - lin.detach())).to(dist.dtype)


def _check_indices(indices_tuple, sizes: Sequence[int], device) -> tuple[Tensor, ...]:
    """sizes: the number of rows each index may address (anchors or references)."""
    n = len(indices_tuple) if isinstance(indices_tuple, tuple | list) else None
    if n != len(sizes):
        got = type(indices_tuple).__name__ + ("" if n is None else f" of length {n}")
        raise ValueError(f"indices_tuple must be a tuple of {len(sizes)} index tensors, got {got}")
    out = []
    for i, (idx, size) in enumerate(zip(indices_tuple, sizes, strict=True)):
        if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{i}] must be an integer tensor")
        if idx.ndim != 1:
            raise ValueError(f"indices_tuple[{i}] must be 1-D, got shape {tuple(idx.shape)}")
        if _checking_values(idx) and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(f"indices_tuple[{i}] has indices outside [0, {size})")
        out.append(idx.to(device=device, dtype=torch.long))
    return tuple(out)


def _reduce_terms(total: Tensor, n_selected: Tensor, n_nonzero: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return total
    denom = n_selected if reduction == "mean" else n_nonzero
    return total / denom.clamp_min(1).to(total.dtype)


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
    _check_choice("reduction", reduction, PAIR_REDUCTIONS)
    labels, ref_emb, ref_labels, scales, ref_scales = _prepare_metric_inputs(
        embeddings, labels, ref_emb, ref_labels, scales, ref_scales, cross_scale
    )
    same = ref_emb is None
    with _full_precision(embeddings.device):
        emb = _upcast(embeddings)
        ref = emb if same else _upcast(ref_emb)
        ref_labels = labels if same else ref_labels
        ref_scales = scales if ref_scales is None else ref_scales
        if indices_tuple is None:
            pos, neg = _block_masks(
                labels, ref_labels, scales if cross_scale else None, ref_scales, same, 0, len(emb)
            )
            dist = pairwise_distances(emb, None if same else ref)
            with torch.no_grad():
                # d/dd of 0.5 d^2 is d; of 0.5 relu(m - d)^2 it is -relu(m - d). The loss
                # is then 0.5 * sum(grad^2) (pos and neg are disjoint).
                d = dist.detach()
                grad_d = torch.where(neg, -torch.relu(margin - d), d).masked_fill(~(pos | neg), 0)
                total = 0.5 * grad_d.square().sum(dtype=_acc_dtype(d))
                n_sel = pos.sum() + neg.sum()
                n_nz = (grad_d != 0).sum() if reduction == "mean_nonzero" else n_sel
            return _reduce_terms(_with_gradient(total, dist, grad_d), n_sel, n_nz, reduction)

        if isinstance(indices_tuple, tuple | list) and len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        a1, p, a2, n = _check_indices(
            indices_tuple, (emb.shape[0], ref.shape[0], emb.shape[0], ref.shape[0]), emb.device
        )
        if a1.shape != p.shape or a2.shape != n.shape:
            raise ValueError("indices_tuple: a1/p and a2/n must have equal lengths")
        d_pos, d_neg = _gathered_distances(emb, ref, same, [(a1, p), (a2, n)], False)
        pos_terms = 0.5 * d_pos.square()
        if cross_scale:
            pos_terms = torch.where(scales[a1] != ref_scales[p], pos_terms, 0)
            n_pos = (scales[a1] != ref_scales[p]).sum()
        else:
            n_pos = torch.full((), len(a1), device=emb.device)
        neg_terms = 0.5 * torch.relu(margin - d_neg).square()
        total = pos_terms.sum() + neg_terms.sum()
        n_nz = (pos_terms > 0).sum() + (neg_terms > 0).sum()
        return _reduce_terms(total, n_pos + len(n), n_nz, reduction)


def _gathered_distances(
    emb: Tensor, ref: Tensor, same: bool, index_pairs: list[tuple[Tensor, Tensor]], squared: bool
) -> list[Tensor]:
    """d(emb[i], ref[j]) for each (i, j) index pair, by whichever needs less memory:
    gathering rows (D floats per pair) or one distance matrix (what PML always does)."""
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


# --------------------------------------------------------------------------- triplet loss


def _count(sorted_rows: Tensor, values: Tensor, right: bool) -> Tensor:
    """Per row, how many sorted entries are <= (right) or < (left) each value."""
    return torch.searchsorted(sorted_rows, values, right=right, out_int32=True)


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
    ``[lo, hi)`` of ``sorted_neg[a]``.

    Args:
        sorted_neg: [B, R] ascending rows, ``+inf`` where not a negative.
        d_ap: [B, R] anchor-positive distances (only entries at positives matter).
        margin: the triplet margin.
        strategy: ``"all"``, ``"semihard"`` or ``"hard"``, as in PML's ``TripletMarginMiner``.

    Returns:
        ``(lo, hi)``, two [B, R] int32 tensors.

    Examples:
        >>> neg = torch.tensor([[0.1, 0.5, 0.9]])  # anchor 0's negative distances, sorted
        >>> d_ap = torch.tensor([[0.4, 0.0, 0.0]])  # column 0 is its positive, at 0.4
        >>> lo, hi = triplet_windows(neg, d_ap, margin=0.2, strategy="semihard")
        >>> lo[0, 0].item(), hi[0, 0].item()  # 0.4 < d(a, n) <= 0.6: only 0.5
        (1, 2)
    """
    thresh = d_ap + margin
    if strategy == "all":
        return torch.zeros_like(d_ap, dtype=torch.int32), _count(sorted_neg, thresh, True)
    if strategy == "hard":
        upper = d_ap if margin > 0 else thresh
        return torch.zeros_like(d_ap, dtype=torch.int32), _count(sorted_neg, upper, True)
    if strategy == "semihard":
        lo = _count(sorted_neg, d_ap, True)
        return lo, torch.maximum(lo, _count(sorted_neg, thresh, True))
    if strategy == "easy":
        n_neg = torch.isfinite(sorted_neg).sum(1, keepdim=True, dtype=torch.int32)
        return _count(sorted_neg, thresh, True), n_neg.expand_as(d_ap)
    raise ValueError(f"strategy must be one of {TRIPLET_STRATEGIES}, got {strategy!r}")


def _triplet_block(d: Tensor, pos: Tensor, neg: Tensor, margin: float, strategy: str, need_sel):
    """Counts for one block of anchors: (coef, loss-carrying triplets, selected triplets).

    Only loss-carrying triplets (``d_an < d_ap + margin``) inside the selection
    matter for the value and gradient; ``k_pos[a, p]`` counts them per positive and
    ``w[a, n]`` per negative. Both sides compare against the same rounded
    thresholds, so the two counts always agree.
    """
    inf = float("inf")
    sorted_neg = torch.where(neg, d, inf).sort(dim=1).values
    thresh = d + margin
    below = _count(sorted_neg, thresh, False)  # negatives with d_an < d_ap + margin
    if strategy == "all" or (strategy == "hard" and margin <= 0):
        k_pos = below
        sel = _count(sorted_neg, thresh, True) if need_sel else None
    elif strategy == "hard":
        k_pos = _count(sorted_neg, d, True)  # d_an <= d_ap, always < d_ap + margin
        sel = k_pos
    else:  # semihard: d_ap < d_an < d_ap + margin
        at_most = _count(sorted_neg, d, True)
        k_pos = (below - at_most).clamp_min_(0)
        sel = (_count(sorted_neg, thresh, True) - at_most).clamp_min_(0) if need_sel else None
    del sorted_neg, below
    sorted_pos = torch.where(pos, d, inf).sort(dim=1).values
    pos_thresh = sorted_pos + margin  # rounding is monotone: still sorted
    if strategy == "hard" and margin > 0:
        w = pos.sum(1, keepdim=True, dtype=torch.int32) - _count(sorted_pos, d, False)
    elif strategy == "semihard":
        w = (_count(sorted_pos, d, False) - _count(pos_thresh, d, True)).clamp_min_(0)
    else:
        w = pos.sum(1, keepdim=True, dtype=torch.int32) - _count(pos_thresh, d, True)
    k_pos = torch.where(pos, k_pos, 0)
    coef = k_pos.to(d.dtype).sub_(torch.where(neg, w, 0).to(d.dtype))
    n_sel = torch.where(pos, sel, 0).sum() if need_sel else None
    return coef, k_pos.sum(), n_sel


def _fused_triplet_loss(dist, labels, ref_labels, scales, ref_scales, same, margin, strategy,
                        reduction):  # fmt: skip
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
    acc = _acc_dtype(dist)
    with torch.no_grad():
        coef = torch.empty_like(dist)
        k_total = torch.zeros((), dtype=torch.int64, device=dist.device)
        n_sel = torch.zeros((), dtype=torch.int64, device=dist.device) if need_sel else None
        for start, stop in _row_blocks(dist.shape[0], dist.shape[1]):
            d = dist[start:stop].detach()
            pos, neg = _block_masks(labels, ref_labels, scales, ref_scales, same, start, stop)
            c, k, n = _triplet_block(d, pos, neg, margin, strategy, need_sel)
            coef[start:stop] = c
            k_total += k
            if need_sel:
                n_sel += n
    value = ((coef * dist).sum(dtype=acc) + margin * k_total.to(acc)).to(dist.dtype)
    return _reduce_terms(value, n_sel if need_sel else k_total, k_total, reduction)


def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 1.0,
    squared: bool = False,
    triplets: str = "all",
    reduction: str = "mean_nonzero",
    indices_tuple: tuple[Tensor, Tensor, Tensor] | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    scales: Tensor | None = None,
    ref_scales: Tensor | None = None,
    cross_scale: bool = False,
) -> Tensor:
    """Triplet margin loss ``relu(d(a,p) - d(a,n) + margin)``, fused or on mined triplets.

    Without ``indices_tuple`` the triplets are never materialised. ``triplets``:

    - ``"all"``, ``"semihard"``, ``"hard"``: the selections of
      pytorch-metric-learning's ``TripletMarginMiner`` with this margin (see
      `triplet_windows`), computed per anchor by sorting negative
      distances, ``searchsorted`` and counting: O(B^2 log B) time, O(B^2) memory;
    - ``"batch_hard"``: per anchor, the farthest positive and the closest negative.

    Args:
        embeddings: [B, D] embeddings.
        labels: [B] integer labels.
        margin: the margin.
        squared: use squared euclidean distances (the SMSE form), otherwise euclidean.
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

    Returns:
        A scalar; a graph-connected zero when no triplet applies.

    Examples:
        >>> emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
        >>> labels = torch.arange(16) % 3
        >>> triplet_margin_loss(emb, labels, margin=0.2, triplets="semihard").backward()
    """
    _check_choice("reduction", reduction, TRIPLET_REDUCTIONS)
    _check_choice("triplets", triplets, FUSED_TRIPLETS)
    labels, ref_emb, ref_labels, scales, ref_scales = _prepare_metric_inputs(
        embeddings, labels, ref_emb, ref_labels, scales, ref_scales, cross_scale
    )
    same = ref_emb is None
    with _full_precision(embeddings.device):
        emb = _upcast(embeddings)
        ref = emb if same else _upcast(ref_emb)
        ref_labels = labels if same else ref_labels
        ref_scales = scales if ref_scales is None else ref_scales
        if indices_tuple is not None:
            if isinstance(indices_tuple, tuple | list) and len(indices_tuple) == 4:
                raise ValueError(
                    "indices_tuple holds pairs (a1, p, a2, n); TripletMarginLoss needs "
                    "triplets (a, p, n), e.g. from TripletMiner"
                )
            a, p, n = _check_indices(
                indices_tuple, (emb.shape[0], ref.shape[0], ref.shape[0]), emb.device
            )
            if not a.shape == p.shape == n.shape:
                raise ValueError("indices_tuple: a, p and n must have equal lengths")
            d_ap, d_an = _gathered_distances(emb, ref, same, [(a, p), (a, n)], squared)
            terms = torch.relu(d_ap - d_an + margin)
            if cross_scale:
                keep = scales[a] != ref_scales[p]
                terms = torch.where(keep, terms, 0)
                n_sel = keep.sum()
            else:
                n_sel = torch.full((), len(a), device=emb.device)
            return _reduce_terms(terms.sum(), n_sel, (terms > 0).sum(), reduction)

        metric = "squared_euclidean" if squared else "euclidean"
        scales = scales if cross_scale else None
        if triplets == "batch_hard":
            return _batch_hard_loss(
                emb, ref, labels, ref_labels, scales, ref_scales, same, margin, squared, reduction
            )
        dist = pairwise_distances(emb, None if same else ref, metric)
        return _fused_triplet_loss(
            dist, labels, ref_labels, scales, ref_scales, same, margin, triplets, reduction
        )


def _hardest(d: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor: has both a positive and a negative, farthest positive, closest negative."""
    valid = pos.any(1) & neg.any(1)
    pos_idx = torch.where(pos, d, float("-inf")).argmax(1)
    neg_idx = torch.where(neg, d, float("inf")).argmin(1)
    return valid, pos_idx, neg_idx


def _batch_hard_loss(emb, ref, labels, ref_labels, scales, ref_scales, same, margin, squared,
                     reduction):  # fmt: skip
    """Per anchor with a positive and a negative: relu(farthest positive - closest
    negative + margin). The choice needs every distance, the gradient only 2B of
    them: choose without autograd, then differentiate just the chosen pairs."""
    metric = "squared_euclidean" if squared else "euclidean"
    picks = []
    with torch.no_grad():
        # blocks of 2^22 entries keep the temporaries in cache; the choice is per row
        for start, stop in _row_blocks(len(emb), len(ref), 1 << 22):
            d = pairwise_distances(emb[start:stop].detach(), ref.detach(), metric)
            pos, neg = _block_masks(labels, ref_labels, scales, ref_scales, same, start, stop)
            picks.append(_hardest(d, pos, neg))
        valid, pos_idx, neg_idx = (torch.cat(t) for t in zip(*picks, strict=True))
    anchors = torch.arange(len(emb), device=emb.device)
    d_ap, d_an = _gathered_distances(
        emb, ref, same, [(anchors, pos_idx), (anchors, neg_idx)], squared
    )
    terms = torch.where(valid, torch.relu(d_ap - d_an + margin), 0)
    return _reduce_terms(terms.sum(), valid.sum(), (terms > 0).sum(), reduction)
