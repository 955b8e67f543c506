"""The contrastive loss against a naive loop over pairs (values and gradients), with a
reference set and mined pairs."""

import pytest
import reference as ref
from helpers import FUSED_PATHS, assert_same, fused_path, make_batch

from smse_metric import ContrastiveLoss, PairMiner, TripletMiner
from smse_metric import functional as smf


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_contrastive_fused_equals_naive(reduction, cross, path):
    emb, labels, scales = make_batch(16, 5, 3, n_scales=2, seed=9)
    emb = emb * 0.6  # some negatives inside the margin, some outside
    same = (labels == labels[0]).nonzero().flatten()
    emb[same[1]] = emb[same[0]]  # a duplicate positive: distance 0, whose gradient is 0
    kw = dict(scales=scales, cross_scale=cross)
    with fused_path(path):
        assert_same(
            lambda e: smf.contrastive_loss(e, labels, 0.7, reduction, **kw),
            lambda e: ref.contrastive(e, labels, 0.7, reduction, **kw),
            emb,
        )


def test_contrastive_with_ref_and_pairs_equals_naive():
    emb, labels, scales = make_batch(10, 4, 3, n_scales=2, seed=10)
    r_emb, r_labels, r_scales = make_batch(9, 4, 3, n_scales=2, seed=11)
    kw = dict(
        ref_emb=r_emb, ref_labels=r_labels, scales=scales, ref_scales=r_scales, cross_scale=True
    )
    assert_same(
        lambda e: smf.contrastive_loss(e, labels, 1.2, "mean", **kw),
        lambda e: ref.contrastive(e, labels, 1.2, "mean", **kw),
        emb,
    )
    pairs = PairMiner("all", cross_scale=True)(
        emb, labels, r_emb, r_labels, scales=scales, ref_scales=r_scales
    )
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
