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

from .._checks import DISTANCES, deprecated
from ._common import (
    CLASS_REDUCTIONS,
    FUSED_TRIPLETS,
    PAIR_REDUCTIONS,
    TRIPLET_REDUCTIONS,
    TRIPLET_STRATEGIES,
)
from .classification import focal_loss, reinforced_focal_loss
from .distances import cross_scale_mask, label_masks, pairwise_distances
from .pairs import contrastive_loss
from .triplets import triplet_margin_loss, triplet_windows

__all__ = [
    "CLASS_REDUCTIONS",
    "DISTANCES",
    "FUSED_TRIPLETS",
    "PAIR_REDUCTIONS",
    "TRIPLET_REDUCTIONS",
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


def __getattr__(name: str) -> tuple[str, ...]:
    # the release before `distance=` exported its values under this name
    if name == "DISTANCE_METRICS":
        deprecated("smse_metric.functional.DISTANCE_METRICS", "smse_metric.functional.DISTANCES", 2)
        return ("euclidean", "squared_euclidean", "cosine")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
