"""Pair and triplet miners that drop into pytorch-metric-learning code.

``miner(embeddings, labels)`` returns index tuples that PML losses and ours
accept: ``(a1, p, a2, n)`` for pairs, ``(a, p, n)`` for triplets. Strategy names
mean what they mean in PML. Mining runs under ``no_grad`` in chunks of anchors,
so working memory is O(chunk x R) plus the output; distances are compared in float64,
so float32 and float64 inputs mine the same tuples. A pair whose distance is not finite
(a NaN or infinite embedding row) is never mined, as in PML, where every comparison
with NaN is false; ``num_non_finite`` counts the pairs so left out. Producing variable-length
index tuples needs one host sync per chunk; mining is not a fused hot path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import functional as smf
from ._checks import check_choice, positive_int, resolve_distance
from .functional import _common as common

__all__ = ["PairMiner", "TripletMiner"]

PAIR_STRATEGIES = ("all", "hard", "batch_hard")


Chunk = tuple[int, Tensor, Tensor, Tensor]


class _Miner(nn.Module):
    distance: str

    def __init__(
        self, strategy: str, choices: Sequence[str], cross_scale: bool, chunk_size: int
    ) -> None:
        super().__init__()
        check_choice("strategy", strategy, choices)
        chunk_size = positive_int("chunk_size", chunk_size)
        self.strategy, self.cross_scale, self.chunk_size = strategy, bool(cross_scale), chunk_size
        self.num_non_finite = 0
        self._scale_checks = common.ScaleChecks(type(self).__name__)

    def _chunks(
        self,
        embeddings: Tensor,
        labels: Tensor,
        scales: Tensor | None,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        ref_scales: Tensor | None,
    ) -> Iterator[Chunk]:
        """Yield (row offset, distances [c, R], positive mask, negative mask) per anchor
        chunk; pairs at a non-finite distance are in neither mask (and counted)."""
        self._scale_checks(scales, ref_scales, self.cross_scale)
        self.num_non_finite = 0
        x = common.metric_inputs(
            embeddings.detach(),
            labels,
            None if ref_emb is None else ref_emb.detach(),
            ref_labels,
            scales,
            ref_scales,
            self.cross_scale,
        )
        emb, ref, same, labels, ref_labels = x.emb, x.ref, x.same, x.labels, x.ref_labels
        scales, ref_scales = x.scales, x.ref_scales
        # decisions on float64 distances (float32 on MPS): a float32 distance near 1
        # cannot resolve a margin comparison closer than its ulp, float64 can
        acc = common.acc_dtype(emb)
        emb, ref = emb.to(acc), ref.to(acc)
        for start in range(0, emb.shape[0], self.chunk_size):
            stop = min(start + self.chunk_size, emb.shape[0])
            with common.full_precision(emb.device):
                dist = smf.pairwise_distances(emb[start:stop], ref, distance=self.distance)
            pos, neg = common.block_masks(
                labels,
                ref_labels,
                scales if self.cross_scale else None,
                ref_scales,
                same,
                start,
                stop,
            )
            finite = dist.isfinite()
            self.num_non_finite += int(torch.count_nonzero((pos | neg) & ~finite))
            yield start, dist, pos & finite, neg & finite


def _batch_hard(dist: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    valid, hardest_pos, hardest_neg = common.hardest(dist, pos, neg)
    anchors = valid.nonzero().squeeze(1)
    return anchors, hardest_pos[anchors], hardest_neg[anchors]


def _empty(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


class TripletMiner(_Miner):
    """Mine triplets ``(a, p, n)``; the selections of PML's ``TripletMarginMiner``.

    With ``t = d(a,n) - d(a,p)``: ``"all"`` keeps ``t <= margin`` (every triplet
    with a non-negative loss), ``"hard"`` ``t <= min(margin, 0)``, ``"semihard"``
    ``0 < t <= margin``, ``"easy"`` ``t > margin``; ``"batch_hard"`` keeps, per
    anchor with a positive and a negative, the farthest positive and the closest
    negative (PML's ``BatchHardMiner``). Negatives are found per anchor as a window
    of its sorted negative distances, so no [B, B, B] tensor is ever built.

    Args:
        strategy: one of the above.
        margin: the triplet margin (use the loss's margin).
        squared: the old spelling of ``distance="squared_l2"`` / ``"l2"``; deprecated,
            warns.
        cross_scale: positives must have a different scale from the anchor.
        max_triplets: keep at most this many: the most violating ones (largest
            ``d(a,p) - d(a,n)``), not a random sample; ``num_candidates`` records how many
            there were.
        chunk_size: anchors per chunk.
        distance: ``"l2"`` (default), ``"squared_l2"`` or ``"cosine"`` (a similarity,
            with PML's margin convention); as in `TripletMarginLoss`.

    Call:
        ``miner(embeddings, labels, ref_emb=None, ref_labels=None, *, scales=None,
        ref_scales=None)``: PML's positional signature (anchors from ``embeddings``,
        positives and negatives from ``ref_emb`` when given), magnification ids [B] / [R]
        keyword-only.

    Shape:
        embeddings [B, D], labels [B] -> three int64 tensors [T].

    Examples:
        >>> miner = TripletMiner("semihard", margin=0.2)
        >>> emb = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
        >>> a, p, n = miner(emb, torch.arange(32) % 4)
    """

    def __init__(
        self,
        strategy: str = "all",
        margin: float = 1.0,
        squared: bool | None = None,
        cross_scale: bool = False,
        max_triplets: int | None = None,
        chunk_size: int = 1024,
        distance: str | None = None,
    ) -> None:
        super().__init__(strategy, smf.TRIPLET_STRATEGIES, cross_scale, chunk_size)
        self.distance = resolve_distance(distance, "l2", squared=squared)
        if max_triplets is not None:
            max_triplets = positive_int("max_triplets", max_triplets)
        self.margin = common.check_margin("margin", margin, allow_negative=True)  # as PML
        self.max_triplets = max_triplets
        self.num_triplets = 0
        self.num_candidates = 0

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        scales: Tensor | None = None,
        ref_scales: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dev = embeddings.device
        kept: list[tuple[Tensor, ...]] = []
        n_candidates = 0
        for start, dist, pos, neg in self._chunks(
            embeddings, labels, scales, ref_emb, ref_labels, ref_scales
        ):
            if self.strategy == "batch_hard":
                a, p, n = _batch_hard(dist, pos, neg)
            else:
                a, p, n = self._windows(dist, pos, neg)
            n_candidates += a.shape[0]
            if self.max_triplets is None:
                kept.append((a + start if start else a, p, n))
            else:
                kept = [self._most_violating([*kept, (a + start, p, n, dist[a, p] - dist[a, n])])]
        self.num_candidates = n_candidates
        if not kept:
            self.num_triplets = 0
            return _empty(dev), _empty(dev), _empty(dev)
        a, p, n = _cat(kept)[:3]
        self.num_triplets = a.shape[0]
        return a, p, n

    def _windows(self, dist: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sorted_neg, order = torch.where(neg, dist, float("inf")).sort(dim=1)
        lo, hi = smf.triplet_windows(sorted_neg, dist, self.margin, self.strategy)
        pa, pp = pos.nonzero(as_tuple=True)
        lo = lo[pa, pp].long()
        counts = (hi[pa, pp].long() - lo).clamp_min_(0)
        # Triplet t of pair k takes the sorted negative lo[k] + (t - first[k]).
        pair = torch.repeat_interleave(counts)
        shift = lo - (torch.cumsum(counts, 0) - counts)
        a = pa[pair]
        rank = torch.arange(len(pair), device=pair.device).add_(shift[pair])
        return a, pp[pair], order[a, rank]

    def _most_violating(self, kept: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        a, p, n, v = _cat(kept)
        if self.max_triplets is None or a.shape[0] <= self.max_triplets:
            return a, p, n, v
        # A stable sort makes the cut deterministic among equal violations.
        top = torch.sort(v, descending=True, stable=True).indices[: self.max_triplets]
        top = top.sort().values
        return a[top], p[top], n[top], v[top]

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy!r}, margin={self.margin}, distance={self.distance!r}, "
            f"cross_scale={self.cross_scale}, max_triplets={self.max_triplets}"
        )


def _cat(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


class PairMiner(_Miner):
    """Mine pairs ``(a1, p, a2, n)`` on euclidean distances (or as ``distance`` says).

    ``"all"``: every positive and negative pair. ``"hard"``: positives farther
    than ``pos_margin`` and negatives closer than ``neg_margin`` (PML's
    ``PairMarginMiner``). ``"batch_hard"``: per anchor with both, its farthest
    positive and closest negative (PML's ``BatchHardMiner`` as pairs).

    Args:
        strategy: ``"all"``, ``"hard"`` or ``"batch_hard"`` (above).
        pos_margin: with ``"hard"``, positives farther than this are kept (with
            ``"cosine"``: less similar).
        neg_margin: with ``"hard"``, negatives closer than this are kept (with
            ``"cosine"``: more similar).
        cross_scale: keep only positives whose scale differs from the anchor's.
        chunk_size: anchors mined at a time: working memory is O(chunk_size x B).
        distance: ``"l2"`` (default), ``"squared_l2"`` or ``"cosine"`` (a similarity,
            margins as in PML's ``PairMarginMiner`` with ``CosineSimilarity``).

    Call:
        ``miner(embeddings, labels, ref_emb=None, ref_labels=None, *, scales=None,
        ref_scales=None)``: PML's positional signature (anchors from ``embeddings``,
        positives and negatives from ``ref_emb`` when given), magnification ids [B] / [R]
        keyword-only.

    Shape:
        embeddings [B, D], labels [B] -> four int64 tensors ([P], [P], [Q], [Q]).

    Examples:
        >>> a1, p, a2, n = PairMiner("hard", pos_margin=0.2, neg_margin=0.8)(
        ...     torch.randn(16, 4), torch.arange(16) % 2)
    """

    def __init__(
        self,
        strategy: str = "all",
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        cross_scale: bool = False,
        chunk_size: int = 1024,
        distance: str = "l2",
    ) -> None:
        super().__init__(strategy, PAIR_STRATEGIES, cross_scale, chunk_size)
        self.distance = resolve_distance(distance, "l2")
        # thresholds as in PML's PairMarginMiner, whose own tests use a negative one
        self.pos_margin = common.check_margin("pos_margin", pos_margin, allow_negative=True)
        self.neg_margin = common.check_margin("neg_margin", neg_margin, allow_negative=True)
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        scales: Tensor | None = None,
        ref_scales: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dev = embeddings.device
        parts: list[tuple[Tensor, ...]] = []
        for start, dist, pos, neg in self._chunks(
            embeddings, labels, scales, ref_emb, ref_labels, ref_scales
        ):
            if self.strategy == "batch_hard":
                a, p, n = _batch_hard(dist, pos, neg)
                parts.append((a + start, p, a + start, n))
                continue
            if self.strategy == "hard" and self.distance == "cosine":  # s = 1 - d
                pos &= 1 - dist < self.pos_margin
                neg &= 1 - dist > self.neg_margin
            elif self.strategy == "hard":
                pos &= dist > self.pos_margin
                neg &= dist < self.neg_margin
            a1, p = pos.nonzero(as_tuple=True)
            a2, n = neg.nonzero(as_tuple=True)
            parts.append((a1 + start, p, a2 + start, n))
        a1, p, a2, n = _cat(parts) if parts else (_empty(dev),) * 4
        self.num_pos_pairs, self.num_neg_pairs = a1.shape[0], a2.shape[0]
        return a1, p, a2, n

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy!r}, pos_margin={self.pos_margin}, "
            f"neg_margin={self.neg_margin}, cross_scale={self.cross_scale}, "
            f"distance={self.distance!r}"
        )
