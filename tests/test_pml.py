"""The PML adapters inside PML's own machinery: same losses, gradients and tuples as
PML's classes with the same distance, reducer and memory."""

import pytest
import torch
from helpers import make_batch, needs_pml

pytestmark = needs_pml
if needs_pml.args[0]:  # skip the module before importing it (its import needs PML)
    pytest.skip("needs pytorch-metric-learning (the [pml] extra)", allow_module_level=True)

from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: E402

from smse_metric import pml as ours  # noqa: E402

DISTANCES = {
    "l2": distances.LpDistance,
    "squared_l2": lambda: distances.LpDistance(power=2),
    "l2_raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "cosine": distances.CosineSimilarity,
}


def _as_set(*indices):
    return set(zip(*[t.tolist() for t in indices], strict=True))


def _value_and_grad(loss_fn, emb, labels, *args):
    e = emb.detach().clone().requires_grad_()
    out = loss_fn(e, labels, *args)
    out.backward()
    return out.detach(), e.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reducer", [None, reducers.MeanReducer, reducers.SumReducer])
@pytest.mark.parametrize("distance", list(DISTANCES))
def test_fused_loss_equals_pml_without_a_tuple(distance, reducer, dtype):
    emb, labels, _ = make_batch(30, 6, 3, seed=3, normalize=False, dtype=dtype)
    kw = {"distance": DISTANCES[distance]()}
    if reducer is not None:
        kw["reducer"] = reducer()
    mine = _value_and_grad(ours.TripletMarginLoss(0.3, **kw), emb, labels)
    theirs = _value_and_grad(losses.TripletMarginLoss(0.3, **kw), emb, labels)
    tol = {"atol": 1e-9, "rtol": 1e-7} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(mine[0], theirs[0], **tol)
    torch.testing.assert_close(mine[1], theirs[1], **tol)


@pytest.mark.parametrize("distance", list(DISTANCES))
def test_miners_and_tuples_equal_pml(distance):
    emb, labels, _ = make_batch(30, 6, 3, seed=4, normalize=False)
    for kind in ("all", "hard", "semihard", "easy"):
        a = ours.TripletMarginMiner(0.2, kind, distance=DISTANCES[distance]())(emb, labels)
        b = miners.TripletMarginMiner(0.2, kind, distance=DISTANCES[distance]())(emb, labels)
        assert _as_set(*a) == _as_set(*b), kind
    # (pos, neg) margins that keep some of each kind: similarities for cosine, the
    # unnormalised embeddings' distances are about 3
    margins = {"cosine": (0.8, 0.3), "l2_raw": (3.0, 3.3)}.get(distance, (0.3, 0.9))
    pa = ours.PairMarginMiner(*margins, distance=DISTANCES[distance]())(emb, labels)
    pb = miners.PairMarginMiner(*margins, distance=DISTANCES[distance]())(emb, labels)
    assert _as_set(*pa[:2]) == _as_set(*pb[:2]) and _as_set(*pa[2:]) == _as_set(*pb[2:])
    assert len(pa[0]) and len(pa[2])
    # tuples from either miner, triplets or pairs, reduced by a reducer PML applies itself
    triplets = miners.TripletMarginMiner(0.2, "semihard", distance=DISTANCES[distance]())(
        emb, labels
    )
    for tup, reducer in ((triplets, reducers.ThresholdReducer(low=0.01)), (pb, None)):
        kw = {"distance": DISTANCES[distance]()} | ({"reducer": reducer} if reducer else {})
        mine = _value_and_grad(ours.TripletMarginLoss(0.2, **kw), emb, labels, tup)
        theirs = _value_and_grad(losses.TripletMarginLoss(0.2, **kw), emb, labels, tup)
        torch.testing.assert_close(mine[0], theirs[0])
        torch.testing.assert_close(mine[1], theirs[1])


def test_cross_batch_memory_gives_pml_s_losses():
    torch.manual_seed(0)
    batches = [make_batch(16, 8, 4, seed=s, normalize=False, dtype=torch.float32)[:2]
               for s in range(4)]  # fmt: skip
    runs = []
    for cls, miner_cls in ((ours.TripletMarginLoss, ours.TripletMarginMiner),
                           (losses.TripletMarginLoss, miners.TripletMarginMiner)):  # fmt: skip
        memory = losses.CrossBatchMemory(cls(0.2), embedding_size=8, memory_size=40,
                                         miner=miner_cls(0.2, "semihard"))  # fmt: skip
        runs.append([memory(emb, labels).item() for emb, labels in batches])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    assert any(v > 0 for v in runs[0])


def test_float16_inputs_are_computed_in_float32():
    emb, labels, _ = make_batch(24, 8, 3, seed=5, normalize=False, dtype=torch.float32)
    mine = ours.TripletMarginLoss(0.2)(emb.half(), labels)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, losses.TripletMarginLoss(0.2)(emb, labels), rtol=2e-3,
                               atol=1e-3)  # fmt: skip


def test_what_has_no_fused_form_is_refused_naming_it():
    with pytest.raises(ValueError, match="SNRDistance"):
        ours.TripletMarginMiner(distance=distances.SNRDistance())
    with pytest.raises(ValueError, match="swap"):
        ours.TripletMarginLoss(swap=True)
    emb, labels, _ = make_batch(12, 4, 2, seed=6)
    with pytest.raises(ValueError, match="ThresholdReducer has no fused form"):
        ours.TripletMarginLoss(0.2, reducer=reducers.ThresholdReducer(low=0.1))(emb, labels)
