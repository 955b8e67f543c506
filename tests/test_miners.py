"""Miners against brute force and PML, on every device."""

import pytest
import reference as ref
import torch
from helpers import DEVICES, clusters, make_batch, needs_pml, pml_miners
from hypothesis import given
from hypothesis import strategies as st

from smse_metric import PairMiner, TripletMiner


def as_set(*idx):
    return set(zip(*[t.tolist() for t in idx], strict=True))


@given(
    n=st.integers(1, 14),
    n_classes=st.integers(1, 4),
    strategy=st.sampled_from(["all", "semihard", "hard", "easy", "batch_hard"]),
    margin=st.sampled_from([0.0, 0.2, 0.7, -0.1]),
    squared=st.booleans(),
    cross=st.booleans(),
    chunk=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_triplet_miner_equals_brute_force(
    n, n_classes, strategy, margin, squared, cross, chunk, seed
):
    emb, labels, scales = make_batch(n, 3, n_classes, n_scales=2, seed=seed)
    miner = TripletMiner(
        strategy,
        margin,
        distance="squared_l2" if squared else "l2",
        cross_scale=cross,
        chunk_size=chunk,
    )
    got = miner(emb, labels, scales=scales)
    assert all(t.dtype == torch.long for t in got)
    want = ref.triplets(emb, labels, margin, strategy, squared, scales=scales, cross_scale=cross)
    assert as_set(*got) == want
    assert len(got[0]) == len(want) == miner.num_triplets == miner.num_candidates


def test_triplet_miner_with_reference_set():
    emb, labels, scales = make_batch(9, 4, 3, n_scales=3, seed=1)
    r_emb, r_labels, r_scales = make_batch(11, 4, 3, n_scales=3, seed=2)
    for strategy in ["all", "semihard", "hard", "easy", "batch_hard"]:
        got = TripletMiner(strategy, 0.3, cross_scale=True, chunk_size=4)(
            emb, labels, r_emb, r_labels, scales=scales, ref_scales=r_scales
        )
        want = ref.triplets(
            emb, labels, 0.3, strategy, False, r_emb, r_labels, scales, r_scales, True
        )
        assert as_set(*got) == want


@needs_pml
@pytest.mark.parametrize("strategy", ["all", "semihard", "hard", "easy"])
def test_triplet_miner_equals_pml_as_sets(strategy):
    emb, labels, _ = make_batch(40, 6, 4, seed=3)
    ours = TripletMiner(strategy, margin=0.2)(emb, labels)
    theirs = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=strategy)(emb, labels)
    assert as_set(*ours) == as_set(*theirs)
    assert len(ours[0]) == len(theirs[0]) > 0


@needs_pml
def test_batch_hard_equals_pml_as_sets():
    emb, labels, _ = make_batch(40, 6, 4, seed=4)
    ours = TripletMiner("batch_hard")(emb, labels)
    theirs = pml_miners.BatchHardMiner()(emb, labels)
    assert as_set(*ours) == as_set(*theirs)
    pairs = PairMiner("batch_hard")(emb, labels)
    a, p, n = theirs
    assert as_set(*pairs[:2]) == as_set(a, p) and as_set(*pairs[2:]) == as_set(a, n)


def test_max_triplets_keeps_the_most_violating_and_counts_the_rest():
    emb, labels, _ = make_batch(30, 4, 3, seed=5)
    full = TripletMiner("all", margin=0.5)(emb, labels)
    miner = TripletMiner("all", margin=0.5, max_triplets=25, chunk_size=4)
    a, p, n = miner(emb, labels)
    assert len(a) == 25 == miner.num_triplets
    assert miner.num_candidates == len(full[0]) > 25
    d = torch.cdist(emb, emb)
    viol_all = sorted((d[full[0], full[1]] - d[full[0], full[2]]).tolist(), reverse=True)
    viol_kept = sorted((d[a, p] - d[a, n]).tolist(), reverse=True)
    torch.testing.assert_close(torch.tensor(viol_kept), torch.tensor(viol_all[:25]))
    assert as_set(a, p, n) <= as_set(*full)


@given(seed=st.integers(0, 2**16), chunk=st.integers(1, 20))
def test_chunking_does_not_change_the_result(seed, chunk):
    emb, labels, _ = make_batch(20, 4, 3, seed=seed)
    one = TripletMiner("semihard", margin=0.4, chunk_size=1024)(emb, labels)
    many = TripletMiner("semihard", margin=0.4, chunk_size=chunk)(emb, labels)
    assert as_set(*one) == as_set(*many)


@given(
    n=st.integers(1, 12),
    n_classes=st.integers(1, 4),
    strategy=st.sampled_from(["all", "hard"]),
    cross=st.booleans(),
    chunk=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_pair_miner_equals_brute_force(n, n_classes, strategy, cross, chunk, seed):
    emb, labels, scales = make_batch(n, 3, n_classes, n_scales=2, seed=seed)
    miner = PairMiner(strategy, 0.5, 1.1, cross_scale=cross, chunk_size=chunk)
    a1, p, a2, n_ = miner(emb, labels, scales=scales)
    P, N = ref.pairs(emb, labels, strategy, 0.5, 1.1, scales=scales, cross_scale=cross)
    assert as_set(a1, p) == P and as_set(a2, n_) == N
    assert miner.num_pos_pairs == len(P) and miner.num_neg_pairs == len(N)


@needs_pml
def test_pair_miner_hard_equals_pml_pair_margin_miner():
    emb, labels, _ = make_batch(40, 6, 3, seed=6)
    ours = PairMiner("hard", pos_margin=0.3, neg_margin=0.9)(emb, labels)
    theirs = pml_miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.9)(emb, labels)
    assert as_set(*ours[:2]) == as_set(*theirs[:2]) and as_set(*ours[2:]) == as_set(*theirs[2:])


@needs_pml
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
def test_pair_and_triplet_miners_equal_pml_with_each_distance(distance):
    from pytorch_metric_learning import distances

    pml_distance = {
        "l2": distances.LpDistance,
        "cosine": distances.CosineSimilarity,
        "squared_l2": lambda: distances.LpDistance(power=2),
    }[distance]
    emb, labels, _ = make_batch(40, 6, 3, seed=7)
    pos_margin, neg_margin = (0.8, 0.3) if distance == "cosine" else (0.3, 0.9)
    ours = PairMiner("hard", pos_margin, neg_margin, distance=distance)(emb, labels)
    theirs = pml_miners.PairMarginMiner(pos_margin, neg_margin, distance=pml_distance())(
        emb, labels
    )
    assert as_set(*ours[:2]) == as_set(*theirs[:2]) and as_set(*ours[2:]) == as_set(*theirs[2:])
    assert len(ours[0]) and len(ours[2])  # both kinds present: the comparison means something
    for strategy in ("all", "semihard", "hard", "easy"):
        mine = TripletMiner(strategy, margin=0.2, distance=distance)(emb, labels)
        pml = pml_miners.TripletMarginMiner(
            0.2, type_of_triplets=strategy, distance=pml_distance()
        )(emb, labels)
        assert as_set(*mine) == as_set(*pml), strategy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["all", "semihard", "hard", "easy", "batch_hard"])
def test_miners_on_every_device_equal_brute_force(strategy, device):
    emb, labels, scales = make_batch(40, 8, 4, n_scales=3, seed=4)
    miner = TripletMiner(strategy, margin=0.2, cross_scale=True, chunk_size=16)
    out = miner(emb.to(device), labels.to(device), scales=scales.to(device))
    assert all(t.device.type == device for t in out)
    want = ref.triplets(emb, labels, 0.2, strategy, scales=scales, cross_scale=True)
    assert set(zip(*[t.tolist() for t in out], strict=True)) == want
    pm = PairMiner("hard", 0.3, 0.9)
    got = pm(emb.to(device), labels.to(device))
    assert [t.tolist() for t in got] == [t.tolist() for t in pm(emb, labels)]


def test_miners_run_without_grad_and_keep_device():
    emb = torch.randn(10, 3, requires_grad=True)
    a, _p, _n = TripletMiner()(emb, torch.arange(10) % 2)
    assert not a.requires_grad and a.device == emb.device


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: TripletMiner("hardest"), "strategy"),
        (lambda: PairMiner("semihard"), "strategy"),
        (lambda: TripletMiner(max_triplets=0), "max_triplets"),
        (lambda: TripletMiner(chunk_size=0), "chunk_size"),
        (lambda: TripletMiner()(torch.randn(4, 2), torch.arange(5)), "labels"),
        (lambda: PairMiner(cross_scale=True)(torch.randn(4, 2), torch.arange(4)), "scales"),
    ],
)
def test_miner_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_near_margin_decisions_follow_the_exact_distances():
    """PML's miner test points: 2-D, 1-3 degrees apart. The exact d_an - d_ap is
    +4.99e-6, so (0, 1, 2) is not hard: PML and float64 mine nothing, and so must float32
    (the float32 expansion |x|^2 + |y|^2 - 2x.y errs by 2e-5 here)."""
    a = torch.tensor([2.0, 1.0, 3.0]) * torch.pi / 180
    emb = torch.nn.functional.normalize(torch.stack([2 * a.cos(), 0.5 * a.sin()], 1), dim=1)
    labels = torch.tensor([0, 0, 1])
    for x in (emb, emb.double()):
        assert all(t.numel() == 0 for t in TripletMiner("hard", margin=0.05)(x, labels))


@given(
    seed=st.integers(0, 2**16),
    squared=st.booleans(),
    strategy=st.sampled_from(["all", "semihard", "hard", "easy", "batch_hard"]),
)
def test_float32_mines_what_float64_mines_on_near_ties(seed, squared, strategy):
    """Tight clusters (points 1e-4 apart around three directions): hard / semihard
    boundaries are decided by differences of 1e-4-scale distances, below the float32
    expansion's error; the float32 triplets equal those of the same points in float64."""
    emb, labels = clusters(seed)
    miner = TripletMiner(strategy, margin=1e-4, distance="squared_l2" if squared else "l2")
    got = set(zip(*[t.tolist() for t in miner(emb, labels)], strict=True))
    assert got == set(zip(*[t.tolist() for t in miner(emb.double(), labels)], strict=True))


def test_pml_positional_signature_and_keyword_only_scales():
    """PML calls ``miner(emb, labels, ref_emb, ref_labels)``; magnification ids are
    keyword-only, so a PML caller's third positional argument is always a reference."""
    emb, labels, scales = make_batch(12, 4, 3, n_scales=2, seed=31)
    r_emb, r_labels, _ = make_batch(9, 4, 3, seed=32)
    positional = TripletMiner("all", 0.3)(emb, labels, r_emb, r_labels)
    keywords = TripletMiner("all", 0.3)(emb, labels, ref_emb=r_emb, ref_labels=r_labels)
    assert (
        as_set(*positional)
        == as_set(*keywords)
        == ref.triplets(emb, labels, 0.3, "all", ref_emb=r_emb, ref_labels=r_labels)
    )
    with pytest.raises(TypeError):
        TripletMiner()(emb, labels, None, None, scales)  # scales only by name
    with pytest.raises(ValueError, match="ref_emb"):
        TripletMiner()(emb, labels, scales)  # 1-D: not a reference set
