"""One distance vocabulary: ``distance="l2" | "squared_l2" | "cosine"`` across losses,
miners, ``functional``, evaluation and the indexes. The previous release's spellings
(``squared=``, ``metric=``, ``"euclidean"`` / ``"squared_euclidean"``,
``functional.DISTANCE_METRICS``, ``EvaluationReport.metric``) give the same result for one
release, with a DeprecationWarning that names the new spelling and points at the
caller's line."""

import warnings

import numpy as np
import pytest
import torch

from smse_metric import (
    KNNClassifier,
    PairMiner,
    TripletMarginLoss,
    TripletMiner,
    evaluate_embeddings,
)
from smse_metric import functional as smf
from smse_metric._checks import DISTANCES, nonnegative_int, positive_int, resolve_distance
from smse_metric.evaluation import TorchIndex, make_index, symmetric_knn

EMB = torch.nn.functional.normalize(torch.randn(24, 6, generator=torch.Generator().manual_seed(0)))
LABELS = torch.arange(24) % 3
X = EMB.numpy()
Y = LABELS.numpy()


def _old_and_new(old, new):
    """(old result, new result), asserting one DeprecationWarning from this file that
    names the new spelling, and none for the new spelling."""
    with pytest.warns(DeprecationWarning) as caught:
        got = old()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].filename == __file__, caught[0].filename  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = new()
    return got, want, str(caught[0].message)


CASES = {
    "loss squared=True": (
        lambda: TripletMarginLoss(0.2, squared=True)(EMB, LABELS),
        lambda: TripletMarginLoss(0.2, distance="squared_l2")(EMB, LABELS),
        "distance='squared_l2'",
    ),
    "loss squared=False": (
        lambda: TripletMarginLoss(0.2, squared=False)(EMB, LABELS),
        lambda: TripletMarginLoss(0.2, distance="l2")(EMB, LABELS),
        "distance='l2'",
    ),
    "functional squared=True": (
        lambda: smf.triplet_margin_loss(EMB, LABELS, 0.2, squared=True),
        lambda: smf.triplet_margin_loss(EMB, LABELS, 0.2, distance="squared_l2"),
        "distance='squared_l2'",
    ),
    "miner squared=True": (
        lambda: TripletMiner("all", 0.2, squared=True)(EMB, LABELS),
        lambda: TripletMiner("all", 0.2, distance="squared_l2")(EMB, LABELS),
        "distance='squared_l2'",
    ),
    "pairwise metric=": (
        lambda: smf.pairwise_distances(EMB, metric="cosine"),
        lambda: smf.pairwise_distances(EMB, distance="cosine"),
        "distance='cosine'",
    ),
    "pairwise metric='squared_euclidean'": (
        lambda: smf.pairwise_distances(EMB, metric="squared_euclidean"),
        lambda: smf.pairwise_distances(EMB, distance="squared_l2"),
        "distance='squared_l2'",
    ),
    "pairwise 'euclidean' positional": (
        lambda: smf.pairwise_distances(EMB, None, "euclidean"),
        lambda: smf.pairwise_distances(EMB, None, "l2"),
        "'l2'",
    ),
    "knn metric=": (
        lambda: KNNClassifier(3, metric="l2").fit(X, Y).predict(X, exclude="none"),
        lambda: KNNClassifier(3, distance="l2").fit(X, Y).predict(X, exclude="none"),
        "distance='l2'",
    ),
    "evaluate metric=": (
        lambda: evaluate_embeddings(X, Y, k=3, metric="l2", clustering=False).to_dict(),
        lambda: evaluate_embeddings(X, Y, k=3, distance="l2", clustering=False).to_dict(),
        "distance='l2'",
    ),
    "make_index metric=": (
        lambda: make_index(X, metric="l2", backend="torch").search(X, 4),
        lambda: make_index(X, distance="l2", backend="torch").search(X, 4),
        "distance='l2'",
    ),
    "TorchIndex metric=": (
        lambda: TorchIndex(X, metric="l2").search(X, 4),
        lambda: TorchIndex(X, distance="l2").search(X, 4),
        "distance='l2'",
    ),
    "symmetric_knn metric=": (
        lambda: symmetric_knn(X, 3, metric="l2"),
        lambda: symmetric_knn(X, 3, distance="l2"),
        "distance='l2'",
    ),
    "functional.DISTANCE_METRICS": (
        lambda: tuple(
            {"euclidean": "l2", "squared_euclidean": "squared_l2"}.get(n, n)
            for n in smf.DISTANCE_METRICS
        ),
        lambda: smf.DISTANCES,
        "smse_metric.functional.DISTANCES",
    ),
    "EvaluationReport.metric": (
        lambda: evaluate_embeddings(X, Y, k=3, distance="l2", clustering=False).metric,
        lambda: evaluate_embeddings(X, Y, k=3, distance="l2", clustering=False).distance,
        "EvaluationReport.distance",
    ),
}


def _equal(a, b) -> None:
    if isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("case", list(CASES))
def test_an_old_spelling_gives_the_same_result_and_names_the_new_one(case):
    old, new, named = CASES[case]
    got, want, message = _old_and_new(old, new)
    _equal(got, want)
    assert "deprecated" in message and named in message, message


@pytest.mark.parametrize(
    "call",
    [
        lambda: TripletMarginLoss(squared=True, distance="cosine"),
        lambda: TripletMiner(squared=False, distance="squared_l2"),
        lambda: smf.pairwise_distances(EMB, None, "cosine", metric="l2"),
        lambda: KNNClassifier(distance="l2", metric="cosine"),
    ],
)
def test_an_old_and_a_new_spelling_that_disagree_are_an_error(call):
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        call()


def test_agreeing_old_and_new_spellings_are_accepted():
    with pytest.warns(DeprecationWarning):
        loss = TripletMarginLoss(squared=True, distance="squared_l2")
    assert loss.distance == "squared_l2"
    with pytest.warns(DeprecationWarning):
        knn = KNNClassifier(metric="euclidean", distance="l2")
    assert knn.distance == "l2"


@pytest.mark.parametrize("distance", DISTANCES)
def test_every_component_takes_every_name(distance):
    """The same three names everywhere, and each object reports the name it was given."""
    assert TripletMarginLoss(distance=distance).distance == distance
    assert TripletMiner(distance=distance).distance == distance
    assert PairMiner(distance=distance).distance == distance
    assert smf.pairwise_distances(EMB, distance=distance).shape == (24, 24)
    assert KNNClassifier(distance=distance).distance == distance
    assert TorchIndex(X, distance=distance).distance == distance
    assert evaluate_embeddings(X, Y, k=3, distance=distance, clustering=False).distance == distance


def test_squared_l2_evaluation_has_the_l2_neighbours_and_squared_distances():
    d2, i2 = TorchIndex(X, distance="squared_l2").search(X, 5)
    d1, i1 = TorchIndex(X, distance="l2").search(X, 5)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_allclose(d2, d1**2, rtol=1e-5, atol=1e-6)


def test_the_new_spellings_warn_nowhere():
    """The library itself uses no old spelling: nothing warns on a plain run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for distance in DISTANCES:
            TripletMarginLoss(distance=distance, triplets="batch_hard")(EMB, LABELS).item()
            a, p, n = TripletMiner("semihard", 0.2, distance=distance)(EMB, LABELS)
            TripletMarginLoss(distance=distance)(EMB, LABELS, (a, p, n)).item()
            evaluate_embeddings(X, Y, k=3, distance=distance, clustering=False)


@pytest.mark.parametrize("bad", ["dot", 2, "L2", ""])
def test_a_bad_distance_names_the_argument(bad):
    assert resolve_distance(None, "cosine") == "cosine"  # None: the caller's default
    with pytest.raises(ValueError, match="distance must be one of"):
        resolve_distance(bad, "l2")
    with pytest.raises(ValueError, match="distance must be one of"):
        TripletMarginLoss(distance=bad)
    with pytest.raises(ValueError, match="distance must be one of"):
        KNNClassifier(distance=bad)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_the_shared_int_checks_name_the_argument(value):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        PairMiner(chunk_size=value)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        KNNClassifier(k=value)
    assert positive_int("n", np.int64(3)) == 3
    if value != 0:
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            nonnegative_int("seed", value)
