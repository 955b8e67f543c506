"""Fault suite, library inputs (issue 23): non-finite embeddings never produce a
label-invalid tuple, misused arguments are refused or warned about, and PML's
conventions hold where a PML user meets them."""

import warnings

import pytest
import torch
from helpers import make_batch, needs_pml
from hypothesis import given, settings
from hypothesis import strategies as st

from smse_metric import ContrastiveLoss, PairMiner, TripletMarginLoss, TripletMiner


def _tuples(*t):
    return set(zip(*[x.tolist() for x in t], strict=True))


def _check_triplets(a, p, n, labels, bad_rows):
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        assert labels[i] == labels[j] and i != j and labels[i] != labels[k], (i, j, k)
        assert not {i, j, k} & bad_rows, (i, j, k)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 14),
    classes=st.integers(1, 4),
    bad=st.sets(st.integers(0, 13), max_size=3),
    value=st.sampled_from([float("nan"), float("inf")]),
    strategy=st.sampled_from(["all", "hard", "semihard", "easy", "batch_hard"]),
    distance=st.sampled_from(["l2", "squared_l2", "cosine"]),
    seed=st.integers(0, 50),
)
def test_triplet_miner_never_mines_a_non_finite_row(
    n, classes, bad, value, strategy, distance, seed
):
    emb, labels, _ = make_batch(n, 3, classes, seed=seed, dtype=torch.float32)
    bad = {b for b in bad if b < n}
    emb[sorted(bad)] = value
    miner = TripletMiner(strategy, margin=0.3, distance=distance, chunk_size=5)
    a, p, neg = miner(emb, labels)
    _check_triplets(a, p, neg, labels.tolist(), bad)
    touching = sum(1 for i in range(n) for j in range(n) if i != j and (i in bad or j in bad))
    assert miner.num_non_finite == touching


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 14),
    bad=st.sets(st.integers(0, 13), max_size=3),
    strategy=st.sampled_from(["all", "hard", "batch_hard"]),
    seed=st.integers(0, 50),
)
def test_pair_miner_never_mines_a_non_finite_row(n, bad, strategy, seed):
    emb, labels, _ = make_batch(n, 3, 3, seed=seed, dtype=torch.float64)
    bad = {b for b in bad if b < n}
    emb[sorted(bad)] = float("nan")
    a1, p, a2, neg = PairMiner(strategy, pos_margin=0.1, neg_margin=2.0)(emb, labels)
    for i, j in zip(a1.tolist(), p.tolist(), strict=True):
        assert labels[i] == labels[j] and i != j and not {i, j} & bad
    for i, j in zip(a2.tolist(), neg.tolist(), strict=True):
        assert labels[i] != labels[j] and not {i, j} & bad


@needs_pml
@pytest.mark.parametrize("strategy", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("row", [0, 5])
def test_nan_rows_mine_what_pml_mines(strategy, row):
    from pytorch_metric_learning import distances, miners

    emb, labels, _ = make_batch(12, 4, 3, seed=row, dtype=torch.float64)
    emb[row] = float("nan")
    raw = distances.LpDistance(normalize_embeddings=False)
    ours = TripletMiner(strategy, margin=0.2)(emb, labels)
    assert _tuples(*ours) == _tuples(
        *miners.TripletMarginMiner(0.2, strategy, distance=raw)(emb, labels)
    )
    pairs = PairMiner("hard", pos_margin=0.3, neg_margin=1.5)(emb, labels)
    pml_pairs = miners.PairMarginMiner(0.3, 1.5, distance=raw)(emb, labels)
    assert _tuples(*pairs[:2]) == _tuples(*pml_pairs[:2])
    assert _tuples(*pairs[2:]) == _tuples(*pml_pairs[2:])


@needs_pml
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("strategy", ["all", "hard", "semihard", "easy"])
def test_cross_batch_memory_with_empty_float16_memory_mines_as_pml(distance, strategy):
    """PML's CrossBatchMemory starts from zero rows; in float16 its normalisation turns
    them into NaN, which PML never mines (nor may we)."""
    from pytorch_metric_learning import distances, losses, miners

    from smse_metric import pml as ours

    dist = {"l2": distances.LpDistance, "cosine": distances.CosineSimilarity}[distance]
    torch.manual_seed(0)
    emb = torch.randn(8, 4, dtype=torch.float16)
    labels = torch.arange(8) % 3
    ref = torch.cat([emb, torch.zeros(16, 4, dtype=torch.float16)])
    ref_labels = torch.cat([labels, torch.zeros(16, dtype=torch.long)])
    theirs = miners.TripletMarginMiner(0.2, strategy, distance=dist())
    mine = ours.TripletMarginMiner(0.2, strategy, distance=dist())
    assert _tuples(*mine(emb, labels, ref, ref_labels)) == _tuples(
        *theirs(emb, labels, ref, ref_labels)
    )
    runs = []
    for miner in (mine, theirs):  # float16 embeddings: the memory starts as float16 zeros
        loss = losses.TripletMarginLoss(0.2, distance=dist())
        memory = losses.CrossBatchMemory(loss, embedding_size=4, memory_size=16, miner=miner)
        runs.append(memory(emb, labels).item())
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "make",
    [
        lambda m: TripletMarginLoss(margin=m),
        lambda m: ContrastiveLoss(margin=m),
        lambda m: TripletMiner(margin=m),
        lambda m: PairMiner(pos_margin=m),
        lambda m: PairMiner(neg_margin=m),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "0.2", None])
def test_non_finite_margins_are_refused(make, bad):
    with pytest.raises(ValueError, match="margin must be"):
        make(bad)


def test_a_negative_pair_loss_margin_is_refused_a_triplet_one_is_pml_s():
    with pytest.raises(ValueError, match=r"margin must be a finite number >= 0, got -0.5"):
        ContrastiveLoss(margin=-0.5)  # relu(-0.5 - d) = 0: the loss would do nothing
    assert TripletMarginLoss(margin=-0.1).margin == -0.1  # PML's hard triplets, margin < 0


def test_scales_without_cross_scale_warn_once():
    emb, labels, scales = make_batch(16, 4, 2, n_scales=2, dtype=torch.float64)
    for module in (TripletMarginLoss(), ContrastiveLoss(), TripletMiner(), PairMiner()):
        with pytest.warns(UserWarning, match="scales= is ignored without cross_scale=True"):
            module(emb, labels, scales=scales)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module(emb, labels, scales=scales)  # once per module


def test_a_single_scale_batch_with_cross_scale_warns_once_and_mixed_scales_do_not():
    emb, labels, scales = make_batch(16, 4, 2, n_scales=2, dtype=torch.float64)
    one = torch.zeros_like(scales)
    for make in (
        lambda: TripletMarginLoss(cross_scale=True),
        lambda: ContrastiveLoss(cross_scale=True),
        lambda: TripletMiner(cross_scale=True),
    ):
        module = make()
        with pytest.warns(UserWarning, match="a single scale: no positive qualifies"):
            module(emb, labels, scales=one)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module(emb, labels, scales=one)
            make()(emb, labels, scales=scales)


@needs_pml
def test_the_pml_adapter_without_labels_or_tuples_raises_pml_s_value_error():
    from pytorch_metric_learning import losses

    from smse_metric import pml as ours

    emb = torch.randn(8, 4)
    for loss in (ours.TripletMarginLoss(), losses.TripletMarginLoss()):
        with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
            loss(emb)
