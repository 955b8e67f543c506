"""What each configurable name makes: the tables behind the config's choices.

`config` takes its choices from these tables' keys (and from the library's own:
``smse_metric.functional.DISTANCES``, ``FUSED_TRIPLETS``), and `build` makes the run's
losses, optimiser and schedule from them, so a name the config accepts is always one
the builder knows. Each entry takes the few values it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from smse_metric.losses import ContrastiveLoss, FocalLoss, ReinforcedFocalLoss, TripletMarginLoss

if TYPE_CHECKING:
    from .config import LossConfig, OptimConfig

__all__ = [
    "CLASSIFICATION_LOSSES",
    "METRIC_DISTANCES",
    "METRIC_LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
]


def _triplet(lc: LossConfig, distance: str) -> nn.Module:
    return TripletMarginLoss(
        margin=lc.margin, distance=distance, triplets=lc.triplets, cross_scale=lc.cross_scale
    )


def _pair(lc: LossConfig, distance: str) -> nn.Module:
    return ContrastiveLoss(margin=lc.margin, cross_scale=lc.cross_scale)


#: ``loss.metric`` -> the metric loss (None: the classification-only baseline)
METRIC_LOSSES: dict[str, Callable[[LossConfig, str], nn.Module] | None] = {
    "triplet": _triplet,
    "pair": _pair,
    "none": None,
}

#: ``loss.metric`` -> the distances its loss takes, the first being the default of an
#: empty ``loss.distance`` (the triplet loss: SMSE's squared form; the pair loss is
#: defined on the euclidean distance)
METRIC_DISTANCES: dict[str, tuple[str, ...]] = {
    "triplet": ("squared_l2", "l2", "cosine"),
    "pair": ("l2",),
    "none": ("l2",),
}


def _rfl(lc: LossConfig, class_counts: np.ndarray) -> nn.Module:
    if lc.beta_from_counts:
        return ReinforcedFocalLoss.from_class_counts(class_counts, lc.alpha, lc.gamma)
    return ReinforcedFocalLoss(lc.alpha, lc.gamma)


#: ``loss.classification`` -> the classification loss, given the training class counts
CLASSIFICATION_LOSSES: dict[str, Callable[[LossConfig, np.ndarray], nn.Module]] = {
    "rfl": _rfl,
    "focal": lambda lc, counts: FocalLoss(lc.gamma),
    "ce": lambda lc, counts: nn.CrossEntropyLoss(),
}

#: ``optim.name`` -> the optimiser class
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

Schedule = torch.optim.lr_scheduler.LRScheduler

#: ``optim.schedule`` -> the learning-rate schedule of an optimiser (None: constant)
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, OptimConfig], Schedule | None]] = {
    "step": lambda opt, oc: torch.optim.lr_scheduler.StepLR(opt, oc.step_size, oc.step_gamma),
    "cosine": lambda opt, oc: torch.optim.lr_scheduler.CosineAnnealingLR(opt, oc.epochs),
    "none": lambda opt, oc: None,
}
