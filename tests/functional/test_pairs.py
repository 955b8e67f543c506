"""The contrastive loss against a naive loop over pairs (values and gradients), with a
reference set and mined pairs."""

import pytest
import reference as ref
import torch
from helpers import FUSED_PATHS, assert_same, fused_path, make_batch

from smse_metric import ContrastiveLoss, PairMiner, TripletMiner
from smse_metric import functional as smf
from smse_metric.functional import distances, pairs


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


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_all_pairs_in_blocks_equal_naive(reduction, with_ref, direct, monkeypatch):
    """The blocked all-pairs path: blocks of 3-4 anchors (a ragged last one), distances
    by the float64 expansion or direct differences, a duplicate positive at distance 0
    (gradient 0); values and the gradients of the batch and of a reference set."""
    monkeypatch.setattr(pairs, "CPU_BLOCK", (64, 1))
    monkeypatch.setattr(distances, "DIRECT_ENTRIES", 1 << 14 if direct else 0)
    emb, labels, scales = make_batch(18, 5, 4, n_scales=3, seed=21)
    emb = emb * 0.6
    emb[5], labels[5], scales[5] = emb[2], labels[2], (scales[2] + 1) % 3  # a duplicate
    r_emb, r_labels, r_scales = make_batch(17, 5, 4, n_scales=3, seed=22)
    kw = dict(scales=scales, cross_scale=True)
    if with_ref:
        r_emb = r_emb.clone().requires_grad_()
        kw |= dict(ref_emb=r_emb, ref_labels=r_labels, ref_scales=r_scales)
    x = emb.clone().requires_grad_()
    with fused_path("sorted"):
        got = smf.contrastive_loss(x, labels, 0.8, reduction, **kw)
    want_x = emb.clone().requires_grad_()
    want = ref.contrastive(want_x, labels, 0.8, reduction, **kw)
    inputs = (x, r_emb) if with_ref else (x,)
    grads = torch.autograd.grad(got, inputs)
    want_grads = torch.autograd.grad(want, (want_x, r_emb) if with_ref else (want_x,))
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-9, rtol=1e-7)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


def test_all_pairs_gradcheck_and_no_grad(monkeypatch):
    """float64 gradcheck of the blocked path (batch and reference); without autograd
    the value alone, equal."""
    monkeypatch.setattr(pairs, "CPU_BLOCK", (40, 1))
    monkeypatch.setattr(distances, "DIRECT_ENTRIES", 0)
    emb, labels, scales = make_batch(12, 4, 3, n_scales=2, seed=23)
    r_emb, r_labels, _ = make_batch(9, 4, 3, seed=24)
    emb, r_emb = (emb * 0.5).requires_grad_(), (r_emb * 0.5).requires_grad_()

    def fn(e, r):
        return smf.contrastive_loss(e, labels, 0.7, ref_emb=r, ref_labels=r_labels)

    with fused_path("sorted"):
        assert torch.autograd.gradcheck(fn, (emb, r_emb))
        assert torch.autograd.gradcheck(lambda e: smf.contrastive_loss(e, labels, 0.7), (emb,))
        with torch.no_grad():
            plain = smf.contrastive_loss(emb, labels, 0.7, scales=scales, cross_scale=True)
        assert plain == smf.contrastive_loss(emb, labels, 0.7, scales=scales, cross_scale=True)
