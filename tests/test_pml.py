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
    batches = [
        make_batch(16, 8, 4, seed=s, normalize=False, dtype=torch.float32)[:2] for s in range(4)
    ]
    runs = []
    for cls, miner_cls in (
        (ours.TripletMarginLoss, ours.TripletMarginMiner),
        (losses.TripletMarginLoss, miners.TripletMarginMiner),
    ):
        memory = losses.CrossBatchMemory(
            cls(0.2), embedding_size=8, memory_size=40, miner=miner_cls(0.2, "semihard")
        )
        runs.append([memory(emb, labels).item() for emb, labels in batches])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    assert any(v > 0 for v in runs[0])


def test_float16_inputs_are_computed_in_float32():
    emb, labels, _ = make_batch(24, 8, 3, seed=5, normalize=False, dtype=torch.float32)
    mine = ours.TripletMarginLoss(0.2)(emb.half(), labels)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(
        mine, losses.TripletMarginLoss(0.2)(emb, labels), rtol=2e-3, atol=1e-3
    )


def test_what_has_no_fused_form_is_refused_naming_it():
    with pytest.raises(ValueError, match="SNRDistance"):
        ours.TripletMarginMiner(distance=distances.SNRDistance())
    with pytest.raises(ValueError, match="swap"):
        ours.TripletMarginLoss(swap=True)
    emb, labels, _ = make_batch(12, 4, 2, seed=6)
    with pytest.raises(ValueError, match="ThresholdReducer has no fused form"):
        ours.TripletMarginLoss(0.2, reducer=reducers.ThresholdReducer(low=0.1))(emb, labels)


# PML 2.9.0's own test cases (tests/miners/test_triplet_margin_miner.py,
# test_pair_margin_miner.py, tests/losses/test_triplet_margin_loss.py), ported: the same
# inputs and brute-force expectations, for our adapters. PML builds its expectation
# from distances in the test's dtype; ours are exact (float64 distances of the
# normalised inputs), since float16 is computed in float32 here (docs/howto/pml.md).
PML_DTYPES = [torch.float16, torch.float32, torch.float64]


def _pml_angle_embeddings(dtype, seed):
    """PML's miner-test input: 16 points at 0..15 degrees on the ellipse (2 cos, 0.5 sin)."""
    angles = torch.arange(16, dtype=torch.float64).deg2rad()
    emb = torch.stack([2 * angles.cos(), 0.5 * angles.sin()], 1).to(dtype)
    return emb, torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(seed))


def _exact_matrix(emb, distance):
    """The distances of the rows as the miners see them, exactly: for L2, normalised in
    their dtype as PML's LpDistance does (the adapter passes those rows on); cosine
    normalises in float64 (our cosine); then float64 direct differences / products."""
    if distance.is_inverted:
        x = torch.nn.functional.normalize(emb.double())
        return x @ x.T
    x = torch.nn.functional.normalize(emb).double()
    return (x[:, None] - x[None]).square().sum(-1).sqrt()


@pytest.mark.parametrize("dtype", PML_DTYPES)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("seed", range(3))
def test_pml_triplet_margin_miner_case(dtype, distance, seed):
    dist = DISTANCES[distance]()
    emb, labels = _pml_angle_embeddings(dtype, seed)
    mat = _exact_matrix(emb, dist)
    triplets = []
    for i in range(16):
        for j in range(16):
            if j == i or labels[j] != labels[i]:
                continue
            for k in range(16):
                if k in (i, j) or labels[k] == labels[j]:
                    continue
                diff = mat[i, j] - mat[i, k] if dist.is_inverted else mat[i, k] - mat[i, j]
                triplets.append((i, j, k, float(diff)))
    for margin in (0.05 * m for m in range(-1, 11)):
        expected = {
            "all": {t[:3] for t in triplets if t[3] <= margin},
            "hard": {t[:3] for t in triplets if t[3] <= margin and t[3] <= 0},
            "semihard": {t[:3] for t in triplets if 0 < t[3] <= margin},
            "easy": {t[:3] for t in triplets if t[3] > margin},
        }
        for kind, want in expected.items():
            miner = ours.TripletMarginMiner(margin, type_of_triplets=kind, distance=dist)
            assert _as_set(*miner(emb, labels)) == want, (margin, kind)


@pytest.mark.parametrize("dtype", PML_DTYPES)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_pml_pair_margin_miner_case(dtype, distance):
    dist = DISTANCES[distance]()
    emb, labels = _pml_angle_embeddings(dtype, 0)
    mat = _exact_matrix(emb, dist)
    pairs = [
        (i, j, float(mat[i, j]), bool(labels[i] == labels[j]))
        for i in range(16)
        for j in range(16)
        if i != j
    ]
    for pos_margin in (0.05 * m for m in range(-1, 4)):
        for neg_margin in (0.05 * m for m in range(2, 7)):
            if dist.is_inverted:
                pos = {(i, j) for i, j, d, same in pairs if same and d < pos_margin}
                neg = {(i, j) for i, j, d, same in pairs if not same and d > neg_margin}
            else:
                pos = {(i, j) for i, j, d, same in pairs if same and d > pos_margin}
                neg = {(i, j) for i, j, d, same in pairs if not same and d < neg_margin}
            a1, p, a2, n = ours.PairMarginMiner(pos_margin, neg_margin, distance=dist)(emb, labels)
            assert (_as_set(a1, p), _as_set(a2, n)) == (pos, neg)


@pytest.mark.parametrize("dtype", PML_DTYPES)
def test_pml_empty_output_case(dtype):
    emb = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    a, p, n = ours.TripletMarginMiner(0.5, type_of_triplets="all")(emb, torch.arange(32))
    assert len(a) == len(p) == len(n) == 0


@pytest.mark.parametrize("dtype", PML_DTYPES)
def test_pml_triplet_margin_loss_case(dtype):
    emb = torch.nn.functional.normalize(
        torch.randn(5, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ).to(dtype)
    labels = torch.tensor([0, 0, 1, 1, 2])
    triplets = [
        (0, 1, 2),
        (0, 1, 3),
        (0, 1, 4),
        (1, 0, 2),
        (1, 0, 3),
        (1, 0, 4),
        (2, 3, 0),
        (2, 3, 1),
        (2, 3, 4),
        (3, 2, 0),
        (3, 2, 1),
        (3, 2, 4),
    ]
    x = emb.double()
    l2 = [torch.relu((x[a] - x[p]).norm() - (x[a] - x[n]).norm() + 0.2) for a, p, n in triplets]
    cos = [torch.relu(x[a] @ x[n] - x[a] @ x[p] + 0.2) for a, p, n in triplets]
    cases = [  # (our loss, PML's expected value from its test)
        (ours.TripletMarginLoss(0.2), sum(l2) / max(sum(t > 0 for t in l2), 1)),
        (ours.TripletMarginLoss(0.2, reducer=reducers.MeanReducer()), sum(l2) / len(l2)),
        (
            ours.TripletMarginLoss(0.2, distance=distances.CosineSimilarity()),
            sum(cos) / max(sum(t > 0 for t in cos), 1),
        ),
        (
            ours.TripletMarginLoss(
                0.2, reducer=reducers.MeanReducer(), distance=distances.CosineSimilarity()
            ),
            sum(cos) / len(cos),
        ),
    ]
    tol = {torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    for loss_fn, want in cases:
        got = loss_fn(emb.clone().requires_grad_(), labels)
        assert float(got.detach()) == pytest.approx(float(want), abs=tol)


def test_an_untested_pml_major_version_is_named_at_import(monkeypatch):
    """The [pml] extra pins >=2.0,<3; a 3.x found anyway is one line naming the range,
    not an AttributeError deep in the adapters."""
    import importlib
    import sys

    import pytorch_metric_learning

    assert pytorch_metric_learning.__version__.split(".")[0] == "2"  # the tested range
    monkeypatch.setattr(pytorch_metric_learning, "__version__", "3.0.0")
    monkeypatch.delitem(sys.modules, "smse_metric.pml")
    with pytest.raises(ImportError, match=r"pytorch-metric-learning>=2\.0,<3, found 3\.0\.0"):
        importlib.import_module("smse_metric.pml")
