"""Metric losses against naive loops, PML, and their stated properties."""

import pytest
import reference as ref
import torch
from conftest import make_batch, metric_losses
from hypothesis import given
from hypothesis import strategies as st

from smse_metric import ContrastiveLoss, PairMiner, TripletMarginLoss, TripletMiner
from smse_metric import functional as smf
from smse_metric.functional import _common as common
from smse_metric.functional.distances import gathered_distances

try:  # the [pml] extra; a core-only install runs everything else
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
except ImportError:
    pml_losses = pml_miners = None
needs_pml = pytest.mark.skipif(
    pml_miners is None, reason="needs pytorch-metric-learning (the [pml] extra)"
)

FUSED = ["all", "semihard", "hard", "batch_hard"]
REDUCTIONS = ["mean_nonzero", "mean", "sum"]


def value_and_grad(fn, emb):
    emb = emb.detach().clone().requires_grad_()
    out = fn(emb)
    (g,) = torch.autograd.grad(out, emb, allow_unused=True)
    return out.detach(), torch.zeros_like(emb) if g is None else g


def assert_same(fn_a, fn_b, emb, atol=1e-9):
    va, ga = value_and_grad(fn_a, emb)
    vb, gb = value_and_grad(fn_b, emb)
    torch.testing.assert_close(va, vb.to(va.dtype), atol=atol, rtol=1e-7)
    torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-7)


def unit(e):
    return torch.nn.functional.normalize(e, dim=1)


# --------------------------------------------------------------------------- triplet


@pytest.mark.parametrize("strategy", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squared", [False, True])
def test_fused_triplet_equals_naive_loop(strategy, reduction, squared):
    emb, labels, _ = make_batch(18, 5, 3, seed=1)
    margin = 0.3 if not squared else 0.5
    assert_same(
        lambda e: smf.triplet_margin_loss(e, labels, margin, squared, strategy, reduction),
        lambda e: ref.triplet_loss(e, labels, margin, strategy, reduction, squared),
        emb,
    )


@given(
    seed=st.integers(0, 2**16),
    strategy=st.sampled_from(["all", "semihard", "hard"]),
    reduction=st.sampled_from(REDUCTIONS),
    margin=st.sampled_from([-1.0, 1.0, 2.0]),
)
def test_fused_triplet_on_exact_ties_equals_naive_loop(seed, strategy, reduction, margin):
    """Points on an integer grid, squared distances: d_an == d_ap and d_an == d_ap +
    margin happen exactly, and the selection's strict and non-strict ends decide
    (values only: the gradient of relu at a tie is a choice)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(-2, 3, (14, 2), generator=g).double()
    labels = torch.randint(0, 3, (14,), generator=g)
    got = smf.triplet_margin_loss(emb, labels, margin, True, strategy, reduction)
    want = ref.triplet_loss(emb, labels, margin, strategy, reduction, squared=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    a, p, n = TripletMiner(strategy, margin, squared=True)(emb, labels)
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == sorted(
        ref.triplets(emb, labels, margin, strategy, squared=True)
    )


@pytest.mark.parametrize("strategy", ["all", "semihard", "hard"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_triplet_in_anchor_blocks_equals_one_block(strategy, reduction, monkeypatch):
    emb, labels, scales = make_batch(23, 5, 3, n_scales=2, seed=21)
    kw = dict(scales=scales, cross_scale=True)

    def loss(e):
        return smf.triplet_margin_loss(e, labels, 0.3, False, strategy, reduction, **kw)

    one = value_and_grad(loss, emb)
    monkeypatch.setattr(common, "BLOCK_ENTRIES", 50)  # blocks of 2 anchors
    assert len(common.row_blocks(23, 23)) == 12
    many = value_and_grad(loss, emb)
    torch.testing.assert_close(one, many)


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_triplet_cross_scale_and_ref_emb(strategy):
    emb, labels, scales = make_batch(12, 4, 3, n_scales=3, seed=2)
    r_emb, r_labels, r_scales = make_batch(10, 4, 3, n_scales=3, seed=3)
    kw = dict(ref_emb=r_emb, ref_labels=r_labels, scales=scales, ref_scales=r_scales,
              cross_scale=True)  # fmt: skip
    assert_same(
        lambda e: smf.triplet_margin_loss(e, labels, 0.4, False, strategy, "mean", **kw),
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
)
def test_fused_triplet_property_matches_naive(
    n, n_classes, n_scales, margin, strategy, reduction, cross, seed
):
    emb, labels, scales = make_batch(n, 3, n_classes, n_scales, seed=seed)
    kw = dict(scales=scales, cross_scale=cross)
    assert_same(
        lambda e: smf.triplet_margin_loss(e, labels, margin, False, strategy, reduction, **kw),
        lambda e: ref.triplet_loss(e, labels, margin, strategy, reduction, **kw),
        emb,
    )


@pytest.mark.parametrize("strategy", ["all", "semihard", "hard", "batch_hard"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_equals_mined(strategy, reduction):
    emb, labels, scales = make_batch(40, 8, 4, n_scales=2, seed=4)
    kw = dict(scales=scales)
    loss = TripletMarginLoss(0.3, triplets=strategy, reduction=reduction, cross_scale=True)
    miner = TripletMiner(strategy, margin=0.3, cross_scale=True, chunk_size=7)
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


@needs_pml
def test_batch_hard_parity_with_pml():
    emb, labels, _ = make_batch(48, 8, 3, seed=6)
    pml = pml_losses.TripletMarginLoss(margin=0.2)
    miner = pml_miners.BatchHardMiner()
    ours = TripletMarginLoss(0.2, triplets="batch_hard")
    assert_same(lambda e: ours(unit(e), labels), lambda e: pml(e, labels, miner(e, labels)), emb)


@needs_pml
def test_pml_tuples_feed_our_losses_and_ours_feed_pml():
    emb, labels, _ = make_batch(32, 6, 3, seed=7)
    pml_trip = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb, labels)
    ours = TripletMarginLoss(0.2)
    assert_same(
        lambda e: ours(e, labels, pml_trip),
        lambda e: ref.triplet_loss_on(e, e, pml_trip, 0.2, False, "mean_nonzero"),
        emb,
    )
    our_trip = TripletMiner("semihard", margin=0.2)(emb, labels)
    assert_same(
        lambda e: pml_losses.TripletMarginLoss(margin=0.2)(e, labels, our_trip),
        lambda e: ours(unit(e), labels, our_trip),
        emb,
    )
    pml_pairs = pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(emb, labels)
    closs = ContrastiveLoss(margin=0.8, reduction="sum")
    P = list(zip(pml_pairs[0].tolist(), pml_pairs[1].tolist(), strict=True))
    N = list(zip(pml_pairs[2].tolist(), pml_pairs[3].tolist(), strict=True))
    assert_same(
        lambda e: closs(e, labels, pml_pairs),
        lambda e: ref.contrastive_on(e, e, P, N, 0.8, "sum"),
        emb,
    )
    our_pairs = PairMiner("hard", pos_margin=0.2, neg_margin=0.8)(emb, labels)
    v = pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)(emb, labels, our_pairs)
    w = pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)(emb, labels, pml_pairs)
    torch.testing.assert_close(v, w)
    assert float(v) > 0


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


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("same", [False, True])
def test_tuple_distances_by_rows_equal_by_matrix(squared, same):
    emb, _, _ = make_batch(10, 3, 2, seed=22)
    ref_emb = emb if same else make_batch(10, 3, 2, seed=23)[0]
    i, j = torch.tensor([0, 1, 2, 7]), torch.tensor([3, 4, 2, 9])
    rows = gathered_distances(emb, ref_emb, same, [(i, j)], squared)[0]  # 4 x 3 <= 100
    big = gathered_distances(emb, ref_emb, same, [(i.repeat(30), j.repeat(30))], squared)[0]
    torch.testing.assert_close(rows, big[:4])
    want = torch.stack([ref.dist(emb[a], ref_emb[b], squared) for a, b in zip(i, j, strict=True)])
    torch.testing.assert_close(rows, want)


# --------------------------------------------------------------------------- contrastive


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("cross", [False, True])
def test_contrastive_fused_equals_naive(reduction, cross):
    emb, labels, scales = make_batch(16, 5, 3, n_scales=2, seed=9)
    emb = emb * 0.6  # some negatives inside the margin, some outside
    kw = dict(scales=scales, cross_scale=cross)
    assert_same(
        lambda e: smf.contrastive_loss(e, labels, 0.7, reduction, **kw),
        lambda e: ref.contrastive(e, labels, 0.7, reduction, **kw),
        emb,
    )


def test_contrastive_with_ref_and_pairs_equals_naive():
    emb, labels, scales = make_batch(10, 4, 3, n_scales=2, seed=10)
    r_emb, r_labels, r_scales = make_batch(9, 4, 3, n_scales=2, seed=11)
    kw = dict(ref_emb=r_emb, ref_labels=r_labels, scales=scales, ref_scales=r_scales,
              cross_scale=True)  # fmt: skip
    assert_same(
        lambda e: smf.contrastive_loss(e, labels, 1.2, "mean", **kw),
        lambda e: ref.contrastive(e, labels, 1.2, "mean", **kw),
        emb,
    )
    pairs = PairMiner("all", cross_scale=True)(emb, labels, scales, r_emb, r_labels, r_scales)
    assert_same(
        lambda e: smf.contrastive_loss(e, labels, 1.2, "mean", pairs, **kw),
        lambda e: ref.contrastive(e, labels, 1.2, "mean", **kw),
        emb,
    )


def test_contrastive_triplet_tuple_is_read_as_pairs():
    emb, labels, _ = make_batch(12, 4, 2, seed=12)
    a, p, n = TripletMiner("all", margin=5.0)(emb, labels)
    loss = ContrastiveLoss(margin=0.9, reduction="sum")
    P = list(zip(a.tolist(), p.tolist(), strict=True))
    N = list(zip(a.tolist(), n.tolist(), strict=True))
    assert_same(
        lambda e: loss(e, labels, (a, p, n)),
        lambda e: ref.contrastive_on(e, e, P, N, 0.9, "sum"),
        emb,
    )


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "fn",
    [
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="all"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="semihard", reduction="mean"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="hard"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, squared=True, triplets="batch_hard"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, scales=s, cross_scale=True),
        lambda e, y, s: smf.contrastive_loss(e, y, 1.0),
        lambda e, y, s: smf.contrastive_loss(e, y, 1.0, scales=s, cross_scale=True),
        lambda e, y, s: smf.pairwise_distances(e).sum(),
        lambda e, y, s: smf.pairwise_distances(e, metric="cosine").sum(),
    ],
)
def test_gradcheck_float64(fn):
    emb, labels, scales = make_batch(10, 4, 3, n_scales=2, seed=13)
    emb = emb.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: fn(e, labels, scales), (emb,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- properties


LOSSES = metric_losses()


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@given(seed=st.integers(0, 2**16), shift=st.floats(-5, 5))
def test_invariances(loss, seed, shift):
    emb, labels, scales = make_batch(14, 4, 3, n_scales=2, seed=seed)
    base = loss(emb, labels, scales=scales)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss(emb[perm], labels[perm], scales=scales[perm]), base)
    relabel = torch.tensor([7, -3, 11])[labels]
    torch.testing.assert_close(loss(emb, relabel, scales=scales), base)
    torch.testing.assert_close(loss(emb + shift, labels, scales=scales), base, atol=1e-8, rtol=1e-6)


def _check_degenerate(loss, emb, labels, scales, expect_zero):
    emb = emb.clone().requires_grad_()
    out = loss(emb, labels, scales=scales)
    assert out.ndim == 0 and torch.isfinite(out)
    assert out.requires_grad
    out.backward()
    assert torch.isfinite(emb.grad).all()
    if expect_zero:
        assert float(out.detach()) == 0.0
        assert torch.count_nonzero(emb.grad) == 0


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_degenerate_batches(loss):
    emb, _, scales = make_batch(6, 3, 1)
    is_triplet = isinstance(loss, TripletMarginLoss)
    # one class: no negatives, so no triplet; the pair loss still pulls positives
    _check_degenerate(loss, emb, torch.zeros(6, dtype=torch.long), scales, is_triplet)
    # all labels distinct: no positives
    _check_degenerate(loss, emb, torch.arange(6), scales, is_triplet)
    # B = 1
    _check_degenerate(loss, emb[:1], torch.zeros(1, dtype=torch.long), scales[:1], True)
    # duplicate embeddings, same and different labels
    dup = emb[[0, 0, 1, 1, 2, 2]]
    _check_degenerate(loss, dup, torch.tensor([0, 0, 1, 1, 0, 1]), scales, False)
    # no cross-scale positive: every positive shares its anchor's scale
    same_scale = torch.tensor([0, 0, 0, 1, 1, 1])
    lab = torch.tensor([0, 0, 0, 1, 1, 1])
    _check_degenerate(loss, emb, lab, same_scale, is_triplet and loss.cross_scale)


def test_duplicate_embeddings_have_zero_gradient_between_them():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    d = smf.pairwise_distances(x)
    assert d.abs().max() == 0
    d.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_bfloat16_autocast_on_cpu_accumulates_in_float32(loss):
    emb, labels, scales = make_batch(32, 8, 3, n_scales=2, dtype=torch.float32, seed=14)
    lin = torch.nn.Linear(8, 8).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(emb)
        assert z.dtype == torch.bfloat16
        out = loss(z, labels, scales=scales)
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(lin.weight.grad).all()
    expected = loss(z.detach().float(), labels, scales=scales)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)


def test_float32_matches_float64():
    emb, labels, _ = make_batch(64, 16, 4, seed=15)
    for strategy in FUSED:
        loss = TripletMarginLoss(0.2, triplets=strategy)
        torch.testing.assert_close(
            loss(emb.float(), labels).double(), loss(emb, labels), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_compiles_fullgraph_without_graph_break(loss):
    emb, labels, scales = make_batch(16, 4, 3, n_scales=2, dtype=torch.float32, seed=16)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    out = compiled(e1, labels, scales=scales)
    out.backward()
    expected = loss(e2, labels, scales=scales)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(e1.grad, e2.grad)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: TripletMarginLoss()(torch.randn(4), torch.arange(4)), ValueError, "embeddings"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(3)), ValueError, "labels"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.rand(4)), TypeError, "labels"),
        (lambda: ContrastiveLoss()(torch.randn(4, 2), torch.arange(4).view(2, 2)), ValueError,
         "labels"),
        (lambda: ContrastiveLoss()(torch.arange(8).view(4, 2), torch.arange(4)), TypeError,
         "embeddings"),
        (lambda: TripletMarginLoss(triplets="hardest"), ValueError, "triplets"),
        (lambda: TripletMarginLoss(reduction="none"), ValueError, "reduction"),
        (lambda: ContrastiveLoss(reduction="avg"), ValueError, "reduction"),
        (lambda: TripletMarginLoss(cross_scale=True)(torch.randn(4, 2), torch.arange(4)),
         ValueError, "scales"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(4), scales=torch.arange(3)),
         ValueError, "scales"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(4),
                                     (torch.tensor([0]), torch.tensor([9]), torch.tensor([1]))),
         ValueError, "indices_tuple"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(4), (torch.tensor([0]),) * 4),
         ValueError, "triplets"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(4),
                                     ref_emb=torch.randn(3, 2)), ValueError, "ref_labels"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(4),
                                     ref_emb=torch.randn(3, 5), ref_labels=torch.arange(3)),
         ValueError, "ref_emb"),
        (lambda: smf.pairwise_distances(torch.randn(3, 2), metric="manhattan"), ValueError,
         "metric"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
