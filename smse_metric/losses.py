"""Loss modules: thin ``nn.Module`` wrappers that hold hyperparameters.

The math lives in [`smse_metric.functional`][smse_metric.functional]. Metric losses are called like
pytorch-metric-learning losses, ``loss(embeddings, labels, indices_tuple=None,
ref_emb=None, ref_labels=None)``, plus ``scales`` / ``ref_scales`` for
cross-scale positives; classification losses like ``nn.CrossEntropyLoss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as smf
from ._checks import check_choice, resolve_distance
from .functional import _common as common

__all__ = ["ContrastiveLoss", "FocalLoss", "ReinforcedFocalLoss", "TripletMarginLoss"]


def _class_weights(values: Tensor | Sequence[float] | None, name: str) -> Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-class weights")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {t.tolist()}")
    return t.clone()


class ReinforcedFocalLoss(nn.Module):
    """Reinforced focal loss of SMSE: ``beta[y] * alpha * (1 - p_y) ** gamma``.

    A class-weighted, powered L1 distance between the softmax output and the
    one-hot target (the form in the SMSE authors' code). See
    [`smse_metric.functional.reinforced_focal_loss`][smse_metric.functional.reinforced_focal_loss].

    Args:
        alpha: scale (> 0).
        gamma: focusing exponent (>= 0).
        beta: None (all ones) or [C] per-class weights; see `from_class_counts`.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Shape:
        logits [N, C], target [N] -> scalar, or [N] with ``reduction="none"``.

    Examples:
        >>> loss_fn = ReinforcedFocalLoss.from_class_counts([2480, 5429])
        >>> loss = loss_fn(torch.randn(4, 2, requires_grad=True), torch.tensor([0, 1, 1, 0]))
        >>> loss.backward()
    """

    beta: Tensor | None

    def __init__(
        self,
        alpha: float = 2.0,
        gamma: float = 1.5,
        beta: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_choice("reduction", reduction, smf.CLASS_REDUCTIONS)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha, self.gamma, self.reduction = float(alpha), float(gamma), reduction
        self.register_buffer("beta", _class_weights(beta, "beta"))

    @classmethod
    def from_class_counts(
        cls,
        counts: Tensor | Sequence[int],
        alpha: float = 2.0,
        gamma: float = 1.5,
        **kwargs: Any,
    ) -> ReinforcedFocalLoss:
        """Weights from class frequencies, the paper's ``beta_c = 1 - n_c / N``."""
        c = torch.as_tensor(counts, dtype=torch.float64)
        if c.ndim != 1 or c.numel() < 2:
            raise ValueError("counts must be a 1-D sequence with one count per class (>= 2)")
        if (c < 0).any() or c.sum() <= 0:
            raise ValueError(f"counts must be non-negative with a positive total, got {c.tolist()}")
        return cls(alpha=alpha, gamma=gamma, beta=(1 - c / c.sum()).float(), **kwargs)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return smf.reinforced_focal_loss(
            logits,
            target,
            alpha=self.alpha,
            gamma=self.gamma,
            beta=self.beta,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class FocalLoss(nn.Module):
    """Classic focal loss (Lin et al.) ``-w[y] (1 - p_y) ** gamma * log p_y``, for ablations.

    Args:
        gamma: focusing exponent, >= 0 (0 with no weight: cross-entropy).
        weight: None (ones) or [C] per-class weights.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Shape:
        logits [N, C], target [N] -> scalar, or [N] with ``reduction="none"``.

    Examples:
        >>> FocalLoss(gamma=2.0)(torch.randn(3, 4), torch.tensor([0, 3, 1])).shape
        torch.Size([])
    """

    weight: Tensor | None

    def __init__(
        self,
        gamma: float = 2.0,
        weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_choice("reduction", reduction, smf.CLASS_REDUCTIONS)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.reduction = float(gamma), reduction
        self.register_buffer("weight", _class_weights(weight, "weight"))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return smf.focal_loss(
            logits, target, gamma=self.gamma, weight=self.weight, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}"


class _MetricLoss(nn.Module):
    def __init__(
        self,
        margin: float,
        reduction: str,
        reductions: Sequence[str],
        cross_scale: bool,
        signed: bool,
    ) -> None:
        super().__init__()
        check_choice("reduction", reduction, reductions)
        self.margin = common.check_margin("margin", margin, allow_negative=signed)
        self.reduction, self.cross_scale = reduction, bool(cross_scale)
        self._scale_checks = common.ScaleChecks(type(self).__name__)


class ContrastiveLoss(_MetricLoss):
    """SMSE pair loss ``0.5 * [y d^2 + (1 - y) relu(margin - d)^2]`` on euclidean d.

    Args:
        margin: negatives closer than this are penalised.
        reduction: ``"mean"`` (over selected positive and negative pairs),
            ``"sum"``, ``"mean_nonzero"``.
        cross_scale: keep only positives whose scale differs from the anchor's.

    Call:
        ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *,
        scales=None, ref_scales=None)``: PML's positional signature, magnification ids
        keyword-only.

    Shape:
        embeddings [B, D], labels [B] (scales [B]) -> scalar.

    Examples:
        >>> loss_fn = ContrastiveLoss(margin=1.0)
        >>> emb = torch.randn(8, 16, requires_grad=True)
        >>> loss_fn(emb, torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])).backward()
    """

    def __init__(
        self, margin: float = 1.0, reduction: str = "mean", cross_scale: bool = False
    ) -> None:
        # relu(margin - d) with margin < 0 is 0 for every pair: a silent no-op
        super().__init__(margin, reduction, smf.PAIR_REDUCTIONS, cross_scale, signed=False)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        scales: Tensor | None = None,
        ref_scales: Tensor | None = None,
    ) -> Tensor:
        self._scale_checks(scales, ref_scales, self.cross_scale)
        return smf.contrastive_loss(
            embeddings,
            labels,
            margin=self.margin,
            reduction=self.reduction,
            indices_tuple=indices_tuple,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
            scales=scales,
            ref_scales=ref_scales,
            cross_scale=self.cross_scale,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, cross_scale={self.cross_scale}"


class TripletMarginLoss(_MetricLoss):
    """Triplet loss ``relu(d(a,p) - d(a,n) + margin)`` with fused exact triplet selection.

    Args:
        margin: the margin.
        squared: the old spelling of ``distance="squared_l2"`` / ``"l2"``; deprecated,
            warns.
        triplets: without an ``indices_tuple``, which triplets: ``"all"``,
            ``"semihard"``, ``"hard"`` (as PML's ``TripletMarginMiner``) or
            ``"batch_hard"``; computed without materialising triplets.
        reduction: ``"mean_nonzero"`` (PML's default), ``"mean"``, ``"sum"``.
        cross_scale: keep only positives whose scale differs from the anchor's.
        distance: ``"l2"`` (default), ``"squared_l2"`` (SMSE's form) or ``"cosine"``:
            the cosine similarity with PML's margin convention,
            ``relu(s(a,n) - s(a,p) + margin)``.

    Call:
        ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *,
        scales=None, ref_scales=None)``: PML's positional signature, magnification ids
        keyword-only.

    Shape:
        embeddings [B, D], labels [B] (scales [B]) -> scalar.

    Examples:
        >>> loss_fn = TripletMarginLoss(margin=0.2, triplets="semihard")
        >>> emb = torch.nn.functional.normalize(torch.randn(32, 16), dim=1).requires_grad_()
        >>> loss_fn(emb, torch.arange(32) % 4).backward()
    """

    def __init__(
        self,
        margin: float = 1.0,
        squared: bool | None = None,
        triplets: str = "all",
        reduction: str = "mean_nonzero",
        cross_scale: bool = False,
        distance: str | None = None,
    ) -> None:
        # a negative margin is PML's too: "hard" then keeps d(a,n) - d(a,p) <= margin
        super().__init__(margin, reduction, smf.TRIPLET_REDUCTIONS, cross_scale, signed=True)
        check_choice("triplets", triplets, smf.FUSED_TRIPLETS)
        self.distance = resolve_distance(distance, "l2", squared=squared)
        self.triplets = triplets

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, Tensor, Tensor] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        scales: Tensor | None = None,
        ref_scales: Tensor | None = None,
    ) -> Tensor:
        self._scale_checks(scales, ref_scales, self.cross_scale)
        return smf.triplet_margin_loss(
            embeddings,
            labels,
            margin=self.margin,
            triplets=self.triplets,
            reduction=self.reduction,
            indices_tuple=indices_tuple,
            ref_emb=ref_emb,
            ref_labels=ref_labels,
            scales=scales,
            ref_scales=ref_scales,
            cross_scale=self.cross_scale,
            distance=self.distance,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, distance={self.distance!r}, triplets={self.triplets!r}, "
            f"reduction={self.reduction!r}, cross_scale={self.cross_scale}"
        )
