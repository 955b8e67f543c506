"""Our fused miners and triplet loss as pytorch-metric-learning classes (the ``[pml]``
extra): swap the import, keep the rest of a PML training loop.

``TripletMarginLoss``, ``TripletMarginMiner`` and ``PairMarginMiner`` here subclass PML's
``BaseMetricLossFunction`` / ``BaseMiner`` and take PML's arguments (``distance=`` a PML
distance object, ``reducer=``, ``embedding_regularizer=``, ...), so PML trainers,
reducers, recorders and ``CrossBatchMemory`` accept them; the work is done by
`smse_metric.TripletMiner`, `smse_metric.PairMiner` and the fused
`smse_metric.functional.triplet_margin_loss`, so no triplet is materialised when no
``indices_tuple`` is given.

Supported distances: ``LpDistance(p=2, power=1 or 2)`` (normalising or not) and
``CosineSimilarity()``; anything else raises a ValueError naming it.

Examples:
    >>> import torch
    >>> from smse_metric.pml import TripletMarginLoss, TripletMarginMiner
    >>> emb = torch.randn(32, 8, requires_grad=True)
    >>> labels = torch.arange(32) % 4
    >>> miner, loss_fn = TripletMarginMiner(0.2, "semihard"), TripletMarginLoss(0.2)
    >>> loss_fn(emb, labels, miner(emb, labels)).backward()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: the pytorch-metric-learning versions the adapters are tested with (the [pml] extra's)
SUPPORTED_PML = ">=2.0,<3"


def check_pml_version(version: str) -> None:
    """Raise an ImportError naming `SUPPORTED_PML` unless ``version`` is a 2.x release
    (3.0 removed ``utils.loss_and_miner_utils``, which these adapters use).

    Args:
        version: ``pytorch_metric_learning.__version__``.

    Examples:
        >>> check_pml_version("2.9.0")
        >>> try:
        ...     check_pml_version("3.0.0")
        ... except ImportError as e:
        ...     print(str(e).split(":")[0])
        smse_metric.pml supports pytorch-metric-learning>=2.0,<3, found 3.0.0
    """
    if version.split(".")[0] != "2":
        raise ImportError(
            f"smse_metric.pml supports pytorch-metric-learning{SUPPORTED_PML}, found "
            f"{version}: pip install 'smse-metric[pml]'"
        )


try:
    import pytorch_metric_learning
except ImportError as e:  # the module is the [pml] extra's
    raise ImportError(
        "smse_metric.pml needs pytorch-metric-learning: pip install 'smse-metric[pml]'"
    ) from e
check_pml_version(pytorch_metric_learning.__version__)

from pytorch_metric_learning import distances, reducers  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

from .functional import triplet_margin_loss  # noqa: E402
from .functional.distances import gathered_distances  # noqa: E402
from .miners import PairMiner, TripletMiner  # noqa: E402

__all__ = ["PairMarginMiner", "TripletMarginLoss", "TripletMarginMiner"]

#: PML reducers the fused loss reproduces without materialising triplets
_FUSED_REDUCTIONS = {
    reducers.AvgNonZeroReducer: "mean_nonzero",
    reducers.MeanReducer: "mean",
    reducers.SumReducer: "sum",
}


def distance_name(distance: distances.BaseDistance) -> str:
    """Our ``distance=`` name of a PML distance object.

    Args:
        distance: ``LpDistance(p=2, power=1 or 2)`` or ``CosineSimilarity()``.

    Examples:
        >>> distance_name(distances.LpDistance(power=2))
        'squared_l2'
        >>> distance_name(distances.CosineSimilarity())
        'cosine'
    """
    if isinstance(distance, distances.CosineSimilarity):
        return "cosine"
    if type(distance) is distances.LpDistance and distance.p == 2 and distance.power in (1, 2):
        return "l2" if distance.power == 1 else "squared_l2"
    raise ValueError(
        f"distance {distance!r} has no fused form; use LpDistance(p=2, power=1 or 2) or "
        "CosineSimilarity(), or PML's own class"
    )


def _inputs(distance, embeddings: Tensor, ref_emb: Tensor) -> tuple[Tensor, Tensor | None]:
    """Embeddings as PML's distance sees them (normalised where it normalises), and the
    reference, None when it is the batch itself (PML passes the same object)."""
    same = ref_emb is embeddings
    if not distance.normalize_embeddings:
        return embeddings, None if same else ref_emb
    if isinstance(distance, distances.CosineSimilarity):
        # our cosine normalises in float64; PML's normalisation in the input dtype turns a
        # float16 zero row (an empty CrossBatchMemory slot) into NaN, which PML then never
        # mines: the same rows become NaN here, the others keep their values
        embeddings = _nan_where_pml_is(distance, embeddings)
        ref_emb = embeddings if same else _nan_where_pml_is(distance, ref_emb)
    else:
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        ref_emb = embeddings if same else torch.nn.functional.normalize(ref_emb, dim=1)
    return embeddings, None if same else ref_emb


def _nan_where_pml_is(distance, x: Tensor) -> Tensor:
    finite = distance.normalize(x.detach()).isfinite().all(1, keepdim=True)
    return torch.where(finite, x, torch.nan)


class TripletMarginMiner(pml_miners.BaseMiner):
    """PML's ``TripletMarginMiner`` (same arguments, same triplets), mined by
    `smse_metric.TripletMiner` without building the [B, B, B] candidate set.

    Args:
        margin: the triplet margin.
        type_of_triplets: ``"all"``, ``"hard"``, ``"semihard"`` or ``"easy"``.
        **kwargs: PML's ``BaseMiner`` arguments (``distance=`` ...).

    Examples:
        >>> emb, labels = torch.randn(16, 4), torch.arange(16) % 2
        >>> a, p, n = TripletMarginMiner(0.1, "hard")(emb, labels)
    """

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.margin, self.type_of_triplets = margin, type_of_triplets
        self.miner = TripletMiner(type_of_triplets, margin, distance=distance_name(self.distance))

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        emb, ref = _inputs(self.distance, embeddings, ref_emb)
        return self.miner(emb, labels, ref, None if ref is None else ref_labels)


class PairMarginMiner(pml_miners.BaseMiner):
    """PML's ``PairMarginMiner`` (same arguments, same pairs), mined by
    `smse_metric.PairMiner` in chunks of anchors.

    Args:
        pos_margin: positives farther than this (less similar, for a similarity).
        neg_margin: negatives closer than this (more similar, for a similarity).
        **kwargs: PML's ``BaseMiner`` arguments (``distance=`` ...).

    Examples:
        >>> a1, p, a2, n = PairMarginMiner(0.2, 0.8)(torch.randn(16, 4), torch.arange(16) % 2)
    """

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.miner = PairMiner(
            "hard", pos_margin, neg_margin, distance=distance_name(self.distance)
        )

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        emb, ref = _inputs(self.distance, embeddings, ref_emb)
        return self.miner(emb, labels, ref, None if ref is None else ref_labels)


class TripletMarginLoss(pml_losses.BaseMetricLossFunction):
    """PML's ``TripletMarginLoss``: the same value and gradient, fused when no
    ``indices_tuple`` is given (every triplet, as PML's default, never materialised).

    With an ``indices_tuple`` (triplets, or pairs that PML converts) the per-triplet
    losses go to the reducer like PML's. Without one, the reducer must be PML's default
    ``AvgNonZeroReducer``, ``MeanReducer`` or ``SumReducer`` (the fused loss computes
    exactly those), else a ValueError says so.

    Args:
        margin: the triplet margin.
        swap: PML's option; not supported (ValueError).
        smooth_loss: PML's option; not supported (ValueError).
        triplets_per_anchor: ``"all"`` (fused) or an int (PML's sampling).
        **kwargs: PML's ``BaseMetricLossFunction`` arguments.

    Examples:
        >>> emb = torch.randn(16, 4, requires_grad=True)
        >>> TripletMarginLoss(0.1)(emb, torch.arange(16) % 2).backward()
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: str | int = "all",
        **kwargs: Any,
    ) -> None:
        if swap or smooth_loss:
            raise ValueError("swap and smooth_loss have no fused form; use PML's class")
        super().__init__(**kwargs)
        self.margin, self.triplets_per_anchor = margin, triplets_per_anchor
        self.distance_name = distance_name(self.distance)

    def get_default_reducer(self):
        return reducers.AvgNonZeroReducer()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels is None and indices_tuple is None:  # PML's own check and message
            raise ValueError("labels and indices_tuple cannot both be None")
        emb, ref = _inputs(self.distance, embeddings, ref_emb)
        fused = indices_tuple is None and self.triplets_per_anchor == "all"
        if fused:
            ours = None if ref is None else ref_labels
            return {
                "loss": {
                    "losses": self._fused(emb, labels, ref, ours),
                    "indices": None,
                    "reduction_type": "already_reduced",
                }
            }
        same = ref is None
        ref_labels = labels if same else ref_labels  # PML's "the batch itself": same object
        a, p, n = lmu.convert_to_triplets(
            indices_tuple, labels, ref_labels, t_per_anchor=self.triplets_per_anchor
        )
        if len(a) == 0:
            return self.zero_losses()
        d_ap, d_an = gathered_distances(
            emb, emb if same else ref, same, [(a, p), (a, n)], self.distance_name
        )
        losses = torch.relu(d_ap - d_an + self.margin)
        return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}

    def _fused(self, emb, labels, ref, ref_labels):
        reduction = _FUSED_REDUCTIONS.get(type(self.reducer))
        if reduction is None:
            raise ValueError(
                f"reducer {type(self.reducer).__name__} has no fused form: pass an "
                "indices_tuple (e.g. from a miner) or use AvgNonZeroReducer, MeanReducer, "
                "SumReducer"
            )
        mode = "sum" if reduction == "mean" else reduction
        value = triplet_margin_loss(
            emb,
            labels,
            margin=self.margin,
            triplets="all",
            reduction=mode,
            ref_emb=ref,
            ref_labels=ref_labels,
            distance=self.distance_name,
        )
        if reduction != "mean":
            return value
        # PML's mean is over every triplet, also those past the margin (loss 0)
        return value / _triplet_count(labels, ref_labels).clamp_min(1)


def _triplet_count(labels: Tensor, ref_labels: Tensor | None) -> Tensor:
    """How many (anchor, positive, negative) triplets a batch has."""
    ref = labels if ref_labels is None else ref_labels
    _, codes = torch.unique(torch.cat([labels, ref]), return_inverse=True)
    counts = torch.bincount(codes[len(labels) :], minlength=int(codes.max()) + 1)
    pos = counts[codes[: len(labels)]] - (1 if ref_labels is None else 0)
    return (pos * (len(ref) - counts[codes[: len(labels)]])).sum()
