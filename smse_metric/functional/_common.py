"""Internal to ``smse_metric.functional`` and the modules built on it (losses, miners):
input checks, precision handling, block masks and reductions shared by the functional
modules. Not public API: its names may change without notice."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Triplet selections shared by the fused loss and [`TripletMiner`][smse_metric.TripletMiner].
TRIPLET_STRATEGIES = ("all", "semihard", "hard", "easy", "batch_hard")


FUSED_TRIPLETS = ("all", "semihard", "hard", "batch_hard")


PAIR_REDUCTIONS = ("mean", "sum", "mean_nonzero")


TRIPLET_REDUCTIONS = ("mean_nonzero", "mean", "sum")


CLASS_REDUCTIONS = ("mean", "sum", "none")


HALF = (torch.float16, torch.bfloat16)


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave any autocast region: distances and sums must not run in half precision."""
    # A fixed list rather than torch.amp.is_autocast_available: dynamo cannot trace that.
    if device.type in AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in HALF else x


def acc_dtype(x: Tensor) -> torch.dtype:
    # float64 accumulation of many signed terms; MPS has no float64.
    return torch.float32 if x.device.type == "mps" else torch.float64


def checking_values(t: Tensor) -> bool:
    """Value checks (ranges) only where they cost no device sync and no graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_margin(name: str, value: object, allow_negative: bool = False) -> float:
    """A margin as a float: a real number, finite and, unless ``allow_negative``,
    non-negative."""
    need = "a finite number" if allow_negative else "a finite number >= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {need}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v < 0 and not allow_negative):
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return v


class ScaleChecks:
    """Warns once per loss or miner about scales that cannot do what the caller meant:
    given without ``cross_scale=True`` (ignored), or all one scale with it (no positive
    qualifies: a zero loss, nothing mined). The second check reads the values, so it
    runs on the first eager call only (never while compiling or capturing a CUDA
    graph): later steps never sync for it."""

    def __init__(self, owner: str) -> None:
        self.owner, self.warned_unused, self.checked_values = owner, False, False

    def __call__(self, scales: Tensor | None, ref_scales: Tensor | None, cross_scale: bool):
        if scales is None or torch.compiler.is_compiling():
            return
        if scales.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if not cross_scale:
            if not self.warned_unused:
                self.warned_unused = True
                warnings.warn(
                    f"{self.owner}: scales= is ignored without cross_scale=True",
                    UserWarning,
                    stacklevel=3,
                )
            return
        if self.checked_values:
            return
        self.checked_values = True
        every = scales if ref_scales is None else torch.cat([scales, ref_scales.to(scales)])
        if every.numel() and bool((every == every[0]).all()):
            warnings.warn(
                f"{self.owner}: cross_scale=True on a batch of a single scale: no positive "
                "qualifies (a zero loss, no tuples); give every scale's images together "
                "(MultiScaleBatchSampler) or drop cross_scale",
                UserWarning,
                stacklevel=3,
            )


def check_float_matrix(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_int_vector(name: str, t: object, length: int, other: str, device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} elements but {other} has {length} rows")
    # no op at all when it is already there: a launch counts on the small-batch paths
    return t if t.device == device else t.to(device, non_blocking=True)


@dataclass
class MetricInputs:
    """The checked inputs of a metric loss or miner: embeddings upcast from half
    precision, and the reference resolved (the batch itself when ``same``)."""

    emb: Tensor
    ref: Tensor
    labels: Tensor
    ref_labels: Tensor
    scales: Tensor | None
    ref_scales: Tensor | None
    same: bool


def metric_inputs(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    scales: Tensor | None,
    ref_scales: Tensor | None,
    cross_scale: bool,
) -> MetricInputs:
    """The one input prologue of the pair and triplet losses and the miners: validate the
    (embeddings, labels, reference, scales) arguments, upcast half precision, and resolve
    the reference (the batch itself when none is given)."""
    check_float_matrix("embeddings", embeddings)
    dev = embeddings.device
    labels = check_int_vector("labels", labels, embeddings.shape[0], "embeddings", dev)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is not None:
        check_float_matrix("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has dimension {ref_emb.shape[1]} but embeddings has {embeddings.shape[1]}"
            )
        ref_labels = check_int_vector("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", dev)
        ref_emb = ref_emb.to(dev)
    if cross_scale and scales is None:
        raise ValueError("cross_scale=True needs scales (the magnification of each embedding)")
    if scales is not None:
        scales = check_int_vector("scales", scales, embeddings.shape[0], "embeddings", dev)
        if ref_emb is not None:
            if cross_scale and ref_scales is None:
                raise ValueError("cross_scale=True with ref_emb needs ref_scales")
            if ref_scales is not None:
                ref_scales = check_int_vector(
                    "ref_scales", ref_scales, ref_emb.shape[0], "ref_emb", dev
                )
    same = ref_emb is None
    emb = upcast(embeddings)
    return MetricInputs(
        emb=emb,
        ref=emb if same else upcast(ref_emb),
        labels=labels,
        ref_labels=labels if same else ref_labels,
        scales=scales,
        ref_scales=scales if ref_scales is None else ref_scales,
        same=same,
    )


def block_masks(
    labels: Tensor,
    ref_labels: Tensor,
    scales: Tensor | None,
    ref_scales: Tensor | None,
    same: bool,
    start: int,
    stop: int,
) -> tuple[Tensor, Tensor]:
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


BLOCK_ENTRIES = 1 << 24


def row_blocks(n_rows: int, n_cols: int, entries: int | None = None) -> list[tuple[int, int]]:
    """Anchor blocks of at most ``entries`` (default BLOCK_ENTRIES) matrix entries."""
    step = max(1, (entries or BLOCK_ENTRIES) // max(n_cols, 1))
    return [(i, min(i + step, n_rows)) for i in range(0, max(n_rows, 1), step)]


def with_gradient(
    value: Tensor, dtype: torch.dtype, grads: Sequence[tuple[Tensor, Tensor]]
) -> Tensor:
    """``value`` (as ``dtype``) in the forward pass, with gradient ``g`` w.r.t. each
    ``(t, g)`` of ``grads``.

    The fused losses know both in closed form. A linear surrogate carries the
    gradients (``sum(g * t)`` minus its own value), so autograd keeps the gradients
    alone instead of every intermediate; unlike a custom autograd.Function it traces
    correctly under every torch.compile version. With no ``grads`` (nothing needs a
    gradient) it is ``value`` alone.
    """
    if not grads:
        return value.to(dtype)
    lin = sum((g * t).sum(dtype=value.dtype) for t, g in grads)
    return (lin + (value - lin.detach())).to(dtype)


def check_indices(indices_tuple, sizes: Sequence[int], device) -> tuple[Tensor, ...]:
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
        if checking_values(idx) and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(f"indices_tuple[{i}] has indices outside [0, {size})")
        out.append(idx.to(device=device, dtype=torch.long))
    return tuple(out)


def reduce_terms(total: Tensor, n_selected: Tensor, n_nonzero: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return total
    denom = n_selected if reduction == "mean" else n_nonzero
    return total / denom.clamp_min(1).to(total.dtype)


def hardest(d: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor: has both a positive and a negative, farthest positive, closest negative.
    ``d`` is overwritten."""
    pos_idx = torch.where(pos, d, float("-inf")).argmax(1, keepdim=True)
    neg_idx = d.masked_fill_(~neg, float("inf")).argmin(1, keepdim=True)
    # an anchor without positives (negatives) gets a pick outside the mask
    valid = (pos.gather(1, pos_idx) & neg.gather(1, neg_idx)).squeeze(1)
    return valid, pos_idx.squeeze(1), neg_idx.squeeze(1)


def hardest_float32(x: Tensor, ref: Tensor, pos: Tensor, neg: Tensor):
    """`hardest` on squared euclidean distances of float32 rows at float32 cost, with
    the float64 choice: the float32 expansion picks, and where a row's runner-up lies
    within twice the expansion's error bound of its pick (rare: a few rows per call,
    every row for collapsed embeddings), that row is chosen again on float64 direct
    differences (ties to the smaller index). Returns None where more than `EXACT_ROWS`
    rows need it: the caller then chooses on the float64 `pairwise_distances`. Eager
    CPU only: the list of such rows is data (a host sync elsewhere)."""
    nx, ny = (x * x).sum(1, keepdim=True), (ref * ref).sum(1)
    sq = torch.addmm(nx, x, ref.T, alpha=-2.0).add_(ny)
    err = (4 * (x.shape[1] + 2) * torch.finfo(torch.float32).eps) * (nx + ny.max())
    top = min(2, sq.shape[1])
    far = torch.where(pos, sq, float("-inf"))
    far_v, far_i = far.topk(top, dim=1)
    near = sq.masked_fill_(~neg, float("inf"))
    near_v, near_i = near.topk(top, dim=1, largest=False)
    # distances are finite: the best is infinite only where a row has no candidate
    valid = far_v[:, 0].isfinite() & near_v[:, 0].isfinite()
    pos_idx, neg_idx = far_i[:, 0], near_i[:, 0]
    if top == 1:
        return valid, pos_idx, neg_idx
    # a runner-up within 2 err of the pick: float32 cannot tell them apart (an infinite
    # runner-up gives an infinite or NaN gap, never close)
    close_far, close_near = far_v.diff(dim=1) >= -err, near_v.diff(dim=1) <= err
    if not (close_far | close_near).any():
        return valid, pos_idx, neg_idx
    for picks, mask, close, largest in (
        (pos_idx, pos, close_far, True),
        (neg_idx, neg, close_near, False),
    ):
        rows = close.squeeze(1).nonzero().squeeze(1)
        if len(rows) > EXACT_ROWS:  # collapsed embeddings: the float64 product instead
            return None
        if len(rows):
            picks[rows] = _exact_pick(x[rows], ref, mask[rows], largest)
    return valid, pos_idx, neg_idx


#: rows per block re-chosen by direct difference; beyond, the float64 product is cheaper
EXACT_ROWS = 64


def _exact_pick(x: Tensor, ref: Tensor, mask: Tensor, largest: bool) -> Tensor:
    """Per row of ``x``: the ``mask``ed column with the largest (smallest) squared
    distance by float64 direct difference, ties to the smaller column (argmax's first),
    in row chunks of 2^22 float64 numbers whatever the batch."""
    ref64 = ref.double()
    out = torch.empty(len(x), dtype=torch.int64, device=x.device)
    step = max(1, (1 << 22) // max(ref.numel(), 1))
    for s in range(0, len(x), step):
        d = (x[s : s + step, None].double() - ref64).square_().sum(-1)
        d.masked_fill_(~mask[s : s + step], float("-inf") if largest else float("inf"))
        out[s : s + step] = d.argmax(1) if largest else d.argmin(1)
    return out
