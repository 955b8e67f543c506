"""Classification losses: SMSE's reinforced focal loss and the classic focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_choice
from ._common import (
    CLASS_REDUCTIONS,
    check_float_matrix,
    check_int_vector,
    checking_values,
    full_precision,
    upcast,
)

__all__ = ["focal_loss", "reinforced_focal_loss"]


def _class_inputs(
    logits: Tensor, target: Tensor, weight: Tensor | Sequence[float] | None, weight_name: str
) -> tuple[Tensor, Tensor | None]:
    check_float_matrix("logits", logits)
    target = check_int_vector("target", target, logits.shape[0], "logits", logits.device)
    n_classes = logits.shape[1]
    if checking_values(target) and target.numel() > 0:
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
    check_choice("reduction", reduction, CLASS_REDUCTIONS)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    target, beta = _class_inputs(logits, target, beta, "beta")
    with full_precision(logits.device):
        log_p = torch.log_softmax(upcast(logits), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
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
    check_choice("reduction", reduction, CLASS_REDUCTIONS)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    target, weight = _class_inputs(logits, target, weight, "weight")
    with full_precision(logits.device):
        log_p = torch.log_softmax(upcast(logits), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -log_p
        if gamma != 0:
            loss = loss * (-torch.expm1(log_p)).clamp_min(0).pow(gamma)
        if weight is not None:
            loss = loss * weight.to(loss.dtype)[target]
        return _reduce_per_sample(loss, reduction)
