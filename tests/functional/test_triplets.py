"""The fused triplet loss against a naive loop over all triplets (values and
gradients), the mined path, and PML."""

import pytest
import reference as ref
import torch
from helpers import (
    FUSED,
    FUSED_PATHS,
    REDUCTIONS,
    assert_same,
    clusters,
    fused_path,
    make_batch,
    needs_pml,
    pml_losses,
    pml_miners,
    unit,
    value_and_grad,
)
from hypothesis import assume, example, given
from hypothesis import strategies as st

from smse_metric import TripletMarginLoss, TripletMiner
from smse_metric import functional as smf
from smse_metric.functional import _common as common


@pytest.mark.parametrize("strategy", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_fused_triplet_equals_naive_loop(strategy, reduction, squared, path):
    emb, labels, _ = make_batch(18, 5, 3, seed=1)
    margin = 0.3 if not squared else 0.5
    with fused_path(path):
        assert_same(
            lambda e: smf.triplet_margin_loss(
                e,
                labels,
                margin,
                distance="squared_l2" if squared else "l2",
                triplets=strategy,
                reduction=reduction,
            ),
            lambda e: ref.triplet_loss(e, labels, margin, strategy, reduction, squared),
            emb,
        )


@given(
    seed=st.integers(0, 2**16),
    strategy=st.sampled_from(["all", "semihard", "hard"]),
    reduction=st.sampled_from(REDUCTIONS),
    margin=st.sampled_from([-1.0, 1.0, 2.0]),
    path=st.sampled_from(FUSED_PATHS),
)
def test_fused_triplet_on_exact_ties_equals_naive_loop(seed, strategy, reduction, margin, path):
    """Points on an integer grid, squared distances: d_an == d_ap and d_an == d_ap +
    margin happen exactly, and the selection's strict and non-strict ends decide
    (values only: the gradient of relu at a tie is a choice)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(-2, 3, (14, 2), generator=g).double()
    labels = torch.randint(0, 3, (14,), generator=g)
    with fused_path(path):
        got = smf.triplet_margin_loss(
            emb, labels, margin, distance="squared_l2", triplets=strategy, reduction=reduction
        )
    want = ref.triplet_loss(emb, labels, margin, strategy, reduction, squared=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    a, p, n = TripletMiner(strategy, margin, distance="squared_l2")(emb, labels)
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == sorted(
        ref.triplets(emb, labels, margin, strategy, squared=True)
    )


@given(
    seed=st.integers(0, 2**16),
    strategy=st.sampled_from(FUSED),
    reduction=st.sampled_from(REDUCTIONS),
    margin=st.sampled_from([-0.5, 0.0, 0.5, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
# batch-hard terms that tie at 0: the sorted path once took its values from gathered
# rows (an ulp off the matrix that chose them), and "mean_nonzero" counted one more term
@example(
    seed=167, strategy="batch_hard", reduction="mean_nonzero", margin=-0.5, dtype=torch.float64
)
@example(seed=66, strategy="batch_hard", reduction="mean_nonzero", margin=0.0, dtype=torch.float32)
def test_cosine_on_tied_directions_takes_the_same_triplets_on_both_paths(
    seed, strategy, reduction, margin, dtype
):
    """Integer grid points, some zero and many along one direction: cosine distances
    tie exactly (0 between rows of one direction, equal angles elsewhere). The
    launch-light path and the sorted path select the same triplets: equal values and
    gradients; in float64 they are the miner's too (in float32 the miner compares the
    float64 distances, and a tie there may not be one in float32). The mined loss
    recomputes its distances by gathering rows, so a zero term of the fused loss may be
    1e-17 there: "mean_nonzero" would count it, the other reductions cannot tell."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(-2, 3, (16, 3), generator=g).to(dtype)
    labels = torch.randint(0, 3, (16,), generator=g)
    loss = TripletMarginLoss(margin, triplets=strategy, reduction=reduction, distance="cosine")
    with fused_path("small"):
        small = value_and_grad(lambda e: loss(e, labels), emb)
    with fused_path("sorted"):
        fused = value_and_grad(lambda e: loss(e, labels), emb)
        if strategy != "batch_hard" and dtype == torch.float64 and reduction != "mean_nonzero":
            miner = TripletMiner(strategy, margin, distance="cosine")
            mined = value_and_grad(lambda e: loss(e, labels, miner(e, labels)), emb)
            torch.testing.assert_close(mined[0], fused[0])
    torch.testing.assert_close(small[0], fused[0])
    # zero rows have gradients of order 1e11 (F.normalize divides them by 1e-12), whose
    # small components are rounding noise of the large ones: compare rows at their scale
    scale = fused[1].abs().amax(1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(small[1] / scale, fused[1] / scale)


@pytest.mark.parametrize("strategy", ["all", "semihard", "hard"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_triplet_in_anchor_blocks_equals_one_block(strategy, reduction, monkeypatch):
    emb, labels, scales = make_batch(23, 5, 3, n_scales=2, seed=21)
    kw = dict(scales=scales, cross_scale=True)

    def loss(e):
        with fused_path("sorted"):
            return smf.triplet_margin_loss(
                e, labels, 0.3, triplets=strategy, reduction=reduction, **kw
            )

    one = value_and_grad(loss, emb)
    monkeypatch.setattr(common, "BLOCK_ENTRIES", 50)  # blocks of 2 anchors
    assert len(common.row_blocks(23, 23)) == 12
    many = value_and_grad(loss, emb)
    torch.testing.assert_close(one, many)


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_triplet_cross_scale_and_ref_emb(strategy):
    emb, labels, scales = make_batch(12, 4, 3, n_scales=3, seed=2)
    r_emb, r_labels, r_scales = make_batch(10, 4, 3, n_scales=3, seed=3)
    kw = dict(
        ref_emb=r_emb, ref_labels=r_labels, scales=scales, ref_scales=r_scales, cross_scale=True
    )
    assert_same(
        lambda e: smf.triplet_margin_loss(
            e, labels, 0.4, triplets=strategy, reduction="mean", **kw
        ),
        lambda e: ref.triplet_loss(e, labels, 0.4, strategy, "mean", **kw),
        emb,
    )


@given(
    n=st.integers(1, 14),
    n_classes=st.integers(1, 4),
    n_scales=st.integers(1, 3),
    margin=st.sampled_from([0.0, 0.1, 0.5, 2.0, -0.2]),
    strategy=st.sampled_from(FUSED),
    reduction=st.sampled_from(REDUCTIONS),
    cross=st.booleans(),
    seed=st.integers(0, 2**16),
    squared=st.booleans(),
    path=st.sampled_from(FUSED_PATHS),
)
def test_fused_triplet_property_matches_naive(
    n, n_classes, n_scales, margin, strategy, reduction, cross, seed, squared, path
):
    emb, labels, scales = make_batch(n, 3, n_classes, n_scales, seed=seed)
    kw = dict(scales=scales, cross_scale=cross)
    with fused_path(path):
        assert_same(
            lambda e: smf.triplet_margin_loss(
                e,
                labels,
                margin,
                distance="squared_l2" if squared else "l2",
                triplets=strategy,
                reduction=reduction,
                **kw,
            ),
            lambda e: ref.triplet_loss(e, labels, margin, strategy, reduction, squared, **kw),
            emb,
        )


@pytest.mark.parametrize("strategy", ["all", "semihard", "hard", "batch_hard"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", FUSED_PATHS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_fused_equals_mined(strategy, reduction, path, distance):
    emb, labels, scales = make_batch(40, 8, 4, n_scales=2, seed=4)
    kw = dict(scales=scales)
    loss = TripletMarginLoss(
        0.3, triplets=strategy, reduction=reduction, cross_scale=True, distance=distance
    )
    miner = TripletMiner(strategy, margin=0.3, cross_scale=True, chunk_size=7, distance=distance)
    with fused_path(path):
        assert_same(
            lambda e: loss(e, labels, **kw),
            lambda e: loss(e, labels, miner(e, labels, **kw), **kw),
            emb,
        )


@needs_pml
@pytest.mark.parametrize("strategy", ["all", "semihard", "hard"])
@pytest.mark.parametrize("margin", [0.1, 0.3])
def test_triplet_parity_with_pml(strategy, margin):
    emb, labels, _ = make_batch(48, 8, 3, seed=5)
    pml = pml_losses.TripletMarginLoss(margin=margin)
    pml_miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=strategy)
    ours = TripletMarginLoss(margin, triplets=strategy)
    ours_miner = TripletMiner(strategy, margin=margin)

    def pml_fn(e):
        return pml(e, labels, pml_miner(e, labels))

    # PML normalises inside its distance, so ours sees normalised embeddings too.
    assert_same(lambda e: ours(unit(e), labels), pml_fn, emb)
    assert_same(lambda e: ours(unit(e), labels, ours_miner(e, labels)), pml_fn, emb)


def _pml_distance(name):
    from pytorch_metric_learning import distances

    return {
        "l2": distances.LpDistance(),
        "squared_l2": distances.LpDistance(power=2),
        "cosine": distances.CosineSimilarity(),
    }[name]


@needs_pml
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
@pytest.mark.parametrize("strategy", ["all", "semihard", "hard", "batch_hard"])
def test_every_distance_matches_pml(strategy, distance):
    """Fused and mined, values and gradients, against PML's miner + loss with the same
    distance object (cosine: a similarity, with PML's margin convention)."""
    emb, labels, _ = make_batch(40, 8, 3, seed=9, normalize=False)
    margin = 0.15
    pml = pml_losses.TripletMarginLoss(margin=margin, distance=_pml_distance(distance))
    if strategy == "batch_hard":
        pml_miner = pml_miners.BatchHardMiner(distance=_pml_distance(distance))
    else:
        pml_miner = pml_miners.TripletMarginMiner(
            margin=margin, type_of_triplets=strategy, distance=_pml_distance(distance)
        )
    ours = TripletMarginLoss(margin, triplets=strategy, distance=distance)
    ours_miner = TripletMiner(strategy, margin=margin, distance=distance)

    def pml_fn(e):
        return pml(e, labels, pml_miner(e, labels))

    # PML's LpDistance normalises by default, so ours gets normalised input for l2; the
    # cosine similarity is scale-free in both, so it gets the raw embeddings
    prep = (lambda e: e) if distance == "cosine" else unit
    assert_same(lambda e: ours(prep(e), labels), pml_fn, emb)
    assert_same(lambda e: ours(prep(e), labels, ours_miner(prep(e), labels)), pml_fn, emb)


def test_distance_choices_are_checked():
    with pytest.raises(ValueError, match="distance must be one of"):
        TripletMarginLoss(distance="dot")
    with pytest.raises(ValueError, match="distance must be one of"):
        TripletMiner(distance="manhattan")


@needs_pml
def test_batch_hard_parity_with_pml():
    emb, labels, _ = make_batch(48, 8, 3, seed=6)
    pml = pml_losses.TripletMarginLoss(margin=0.2)
    miner = pml_miners.BatchHardMiner()
    ours = TripletMarginLoss(0.2, triplets="batch_hard")
    assert_same(lambda e: ours(unit(e), labels), lambda e: pml(e, labels, miner(e, labels)), emb)


def test_mined_triplets_with_cross_scale_drop_same_scale_positives():
    emb, labels, scales = make_batch(16, 4, 2, n_scales=2, seed=8)
    trip = TripletMiner("all", margin=10.0)(emb, labels)
    kept = [i for i, (a, p) in enumerate(zip(*trip[:2], strict=True)) if scales[a] != scales[p]]
    sub = tuple(t[kept] for t in trip)
    loss = TripletMarginLoss(10.0, reduction="mean", cross_scale=True)
    assert_same(
        lambda e: loss(e, labels, trip, scales=scales),
        lambda e: ref.triplet_loss_on(e, e, sub, 10.0, False, "mean"),
        emb,
    )


def _merged_by_rounding(emb: torch.Tensor, squared: bool) -> bool:
    """Whether some anchor has two distances that differ in float64 and are equal in
    float32."""
    distance = "squared_l2" if squared else "l2"
    d32 = smf.pairwise_distances(emb, distance=distance)
    d64 = smf.pairwise_distances(emb.double(), distance=distance)
    same32 = d32[:, :, None] == d32[:, None, :]
    return bool((same32 & (d64[:, :, None] != d64[:, None, :])).any())


@given(
    seed=st.integers(0, 2**16),
    squared=st.booleans(),
    strategy=st.sampled_from(["all", "semihard", "hard", "batch_hard"]),
    path=st.sampled_from(FUSED_PATHS),
)
def test_float32_fused_loss_equals_float64_on_near_ties(seed, squared, strategy, path):
    """The fused selection follows the exact distances too: float32 and float64 select
    the same triplets on tight clusters. A triplet's term is about 1e-4 here, so one
    differently selected triplet moves the sum by more than the tolerance, which allows
    for float32 rounding of the distances and of the sum itself (up to ~65 for "all":
    2.1e-7 relative at worst over 860 draws, so rtol 1e-6 keeps a 5x margin and stays
    under one triplet's 1e-4)."""
    emb, labels = clusters(seed)
    # where two of an anchor's distances differ in float64 but round to one float32
    # (seed 1125: 0.61030445 and 0.61030448), float32 cannot tell which is larger, and
    # semihard's d(a,p) < d(a,n) or hard's d(a,n) <= d(a,p) may decide otherwise
    assume(strategy in ("all", "batch_hard") or not _merged_by_rounding(emb, squared))
    loss = TripletMarginLoss(
        1e-4, distance="squared_l2" if squared else "l2", triplets=strategy, reduction="sum"
    )
    with fused_path(path):
        (got, g32), (want, g64) = (
            value_and_grad(lambda e: loss(e, labels), x) for x in (emb, emb.double())
        )
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    if strategy == "batch_hard":  # the same chosen pairs: the same gradient
        torch.testing.assert_close(g32.double(), g64, rtol=2e-2, atol=1e-3)  # f32 directions


@given(
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([0.0, 1e-7, 1e-4, 1.0]),
    n_labels=st.integers(1, 6),
)
def test_float32_batch_hard_choice_equals_the_float64_choice(seed, spread, n_labels):
    """The float32-first pick (CPU) against the pick on float64 direct differences
    (ties to the smaller index), on copies of a few points moved by `spread` (0: exact
    duplicates, all ties), with anchors that have one positive, none, or no negative."""
    g = torch.Generator().manual_seed(seed)
    base = unit(torch.randn(4, 16, generator=g))
    emb = base[torch.randint(0, 4, (40,), generator=g)] + spread * torch.randn(40, 16, generator=g)
    labels = torch.randint(0, n_labels, (40,), generator=g)
    labels[0] = 99  # a label of its own: no positive
    pos, neg = common.block_masks(labels, labels, None, None, True, 0, 40)
    exact = (emb.double()[:, None] - emb.double()[None]).pow(2).sum(-1)
    want = common.hardest(exact, pos, neg)
    got = common.hardest_float32(emb, emb, pos, neg)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1][want[0]], want[1][want[0]])
    assert torch.equal(got[2][want[0]], want[2][want[0]])


def test_collapsed_batch_hard_takes_the_float64_product_and_keeps_its_choice():
    """Every row of collapsed embeddings is a near tie: beyond EXACT_ROWS rows the
    float32-first pick hands over to the float64 distances (None), whose choice (ties
    at an exact 0: the first positive and the first negative) the loss then uses."""
    emb = unit(torch.ones(200, 8)) + 1e-9 * torch.randn(200, 8, generator=torch.Generator())
    labels = torch.arange(200) % 4
    pos, neg = common.block_masks(labels, labels, None, None, True, 0, 200)
    assert common.hardest_float32(emb, emb, pos, neg) is None
    loss = TripletMarginLoss(0.2, triplets="batch_hard", reduction="sum")
    (got, g32), (want, g64) = (
        value_and_grad(lambda e: loss(e, labels), x) for x in (emb, emb.double())
    )
    torch.testing.assert_close(got.double(), want)
    torch.testing.assert_close(g32.double(), g64)


@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**16),
)
def test_one_sort_counts_as_the_two_sorts(rows, cols, dtype, seed):
    """The single sort (positives keyed below negatives by the sign bit) counts and
    orders exactly as sorting each side apart: distances with ties, +0.0 and
    -0.0, and queries of every sign, at either side of ``searchsorted``."""
    from smse_metric.functional import triplets

    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 4, (rows, cols), generator=g).to(dtype) / 2
    d = torch.where(torch.rand(rows, cols, generator=g) < 0.2, -0.0, d)
    member = torch.randint(0, 3, (rows, cols), generator=g)
    pos, neg = member == 0, member == 1
    n_pos = pos.sum(1, keepdim=True, dtype=torch.int32)
    count_one, pos_one = triplets._one_sort(d, pos, neg, n_pos)
    sorted_neg = torch.where(neg, d, torch.inf).sort(dim=1).values
    pos_two = torch.where(pos, d, torch.inf).sort(dim=1).values

    def count_two(values, right):
        return torch.searchsorted(sorted_neg, values, right=right, out_int32=True)

    torch.testing.assert_close(pos_one, pos_two, rtol=0, atol=0)
    # finite, as every bound is (the two sorts' +inf padding would count at +inf)
    values = torch.tensor([-1.0, -0.0, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0], dtype=dtype)
    values = values.expand(rows, -1).contiguous()
    for right in (False, True):
        assert torch.equal(count_one(values, right), count_two(values, right))


@given(
    st.integers(1, 6),
    st.integers(1, 12),
    st.sampled_from(["all", "semihard", "hard"]),
    st.sampled_from([-0.5, 0.0, 1e-20, 0.5, 1.0]),  # 1e-20: d_ap + margin rounds to d_ap
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**16),
)
def test_one_merged_sort_counts_as_the_binary_searches(rows, cols, strategy, margin, dtype, seed):
    """The merged sort of negatives and bounds gives every (anchor, positive) and
    (anchor, negative) count that the sort-and-search path gives: distances on a grid of
    halves (ties between d_an, d_ap and d_ap + margin everywhere), +0.0 and -0.0, rows
    without positives or negatives, and non-members."""
    from smse_metric.functional import triplets

    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 4, (rows, cols), generator=g).to(dtype) / 2
    d = torch.where(torch.rand(rows, cols, generator=g) < 0.2, -0.0, d)
    member = torch.randint(0, 3, (rows, cols), generator=g)
    pos, neg = member == 0, member == 1
    coef, k = triplets._merged(d, pos, neg, margin, strategy)
    want_coef, want_k, _ = triplets._triplet_block(d, pos, neg, margin, strategy, True)
    assert torch.equal(coef, want_coef)
    assert int(k) == int(want_k)


@pytest.mark.parametrize("cols", [5, 60_000, 100_000])
def test_block_totals_are_exact_int64_sums(cols):
    """`_total` sums int32 counts by rows in int32 while a row cannot overflow (fewer
    than 2^16 columns: at most (cols / 2)^2 triplets a row), in int64 beyond: rows of
    cols / 2 positives with cols / 2 negatives each, the most a row can count (at
    100,000 columns, 2.5e9: past int32)."""
    from smse_metric.functional.triplets import _total

    counts = torch.full((3, cols), max(cols // 2, 1), dtype=torch.int32)
    counts[:, : cols // 2] = 0  # the negatives' entries; positives count cols / 2 each
    got = _total(counts)
    assert got.dtype == torch.int64
    assert got == counts.to(torch.int64).sum()
