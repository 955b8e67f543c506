"""Retrieval and classification metrics by hand and against PML's AccuracyCalculator."""

import math

import numpy as np
import pytest
import torch
from helpers import knn_data, needs_faiss, needs_pml

from smse_metric import evaluate_embeddings, evaluate_predictions
from smse_metric.evaluation import RetrievalMetrics

PML_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)


class BruteKNN:
    """PML knn_func: float64 squared-L2 distances, ties by reference index, and PML's
    own removal of the query itself when the reference includes the queries."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        from pytorch_metric_learning.utils.inference import return_results

        k = k + 1 if ref_includes_query else k
        d = torch.cdist(query.double(), reference.double()) ** 2
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        return return_results(torch.gather(d, 1, order), order, ref_includes_query)


def pml(query, labels, reference=None, ref_labels=None, ref_includes_query=False, k=None, **kwargs):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=PML_METRICS, k=k, knn_func=BruteKNN(), device=torch.device("cpu"), **kwargs
    )
    as_t = lambda x: None if x is None else torch.as_tensor(np.asarray(x))  # noqa: E731
    return calc.get_accuracy(
        as_t(query), as_t(labels), as_t(reference), as_t(ref_labels), ref_includes_query
    )


def assert_equal_to_pml(ours: RetrievalMetrics, theirs: dict, classes=None, scored=None):
    for name, value in ours.to_pml().items():
        if isinstance(theirs[name], list):  # return_per_class: classes with scored queries
            key = {"mean_average_precision_at_r": "map_at_r"}.get(name, name)
            mine = [v for v in ours.per_class[key] if not math.isnan(v)]
            assert mine == pytest.approx(theirs[name], abs=1e-6), name  # PML: MRR in float32
        elif math.isnan(theirs[name]):
            assert math.isnan(value), name
        else:
            assert value == pytest.approx(theirs[name], abs=1e-6), name  # PML: MRR in float32


def ours(emb, y, **kwargs):
    kwargs = {"k": 1, "distance": "l2", "clustering": False, **kwargs}
    return evaluate_embeddings(emb, y, **kwargs)


@needs_pml
@pytest.mark.parametrize("retrieval_k", ["max_bin_count", None, 3])
@pytest.mark.parametrize("average", ["query", "class", "per_class"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_leave_one_out_equals_pml(retrieval_k, average, dtype):
    emb, y, _, _ = knn_data(n=90, classes=4, seed=5)
    emb = emb.astype(dtype).astype(np.float32)  # PML computes in float32 whatever it gets
    kw = {"avg_of_avgs": average == "class", "return_per_class": average == "per_class"}
    theirs = pml(emb, y, k=retrieval_k, **kw)
    r = ours(
        emb,
        y,
        exclude="self",
        retrieval_k=retrieval_k,
        average="class" if average == "class" else "query",
    ).retrieval
    assert_equal_to_pml(r, theirs)
    assert r.queries_scored == 90


@needs_pml
@pytest.mark.parametrize("retrieval_k", ["max_bin_count", None, 2])
def test_separate_gallery_with_ties_unseen_labels_and_lone_items_equals_pml(retrieval_k):
    rng = np.random.default_rng(3)
    # an integer grid: many exact distance ties, settled by gallery index on both sides
    gallery = rng.integers(0, 3, (60, 2)).astype(np.float32)
    g_labels = rng.integers(0, 4, 60)
    g_labels[7] = 9  # a one-item class
    query = rng.integers(0, 3, (40, 2)).astype(np.float32)
    q_labels = rng.integers(0, 4, 40)
    q_labels[:3] = [9, -1, -1]  # -1: a label the gallery lacks, first in the class order
    for average in ("query", "class"):
        theirs = pml(
            query, q_labels, gallery, g_labels, k=retrieval_k, avg_of_avgs=average == "class"
        )
        r = ours(
            query,
            q_labels,
            exclude="none",
            gallery=(gallery, g_labels, None, None),
            retrieval_k=retrieval_k,
            average=average,
        )
        assert_equal_to_pml(r.retrieval, theirs)
        assert r.retrieval.queries_scored == 38
        assert (r.retrieval.queries_unseen_label, r.retrieval.queries_without_relevant) == (2, 0)
    nearest = BruteKNN()(torch.from_numpy(query), 1, torch.from_numpy(gallery))[1][:, 0]
    assert r.pooled.accuracy == np.mean(g_labels[nearest.numpy()] == q_labels)
    assert r.classes == [-1, 0, 1, 2, 3, 9]


@needs_pml
def test_reference_holding_the_queries_equals_pml():
    """PML's ref_includes_query: the reference starts with the queries. Ours: the same
    gallery, each query and its own copy one group, left out by exclude='group'."""
    rng = np.random.default_rng(4)
    extra = rng.integers(0, 3, (25, 2)).astype(np.float32)
    query = rng.integers(0, 3, (30, 2)).astype(np.float32)
    q_labels, e_labels = rng.integers(0, 3, 30), rng.integers(0, 3, 25)
    q_labels[0] = 5  # only in the query itself: a lone query, left out by both
    gallery, g_labels = np.concatenate([query, extra]), np.concatenate([q_labels, e_labels])
    theirs = pml(query, q_labels, gallery, g_labels, ref_includes_query=True)
    r = ours(
        query,
        q_labels,
        groups=np.arange(30),
        exclude="group",
        retrieval_k=None,
        gallery=(gallery, g_labels, np.arange(55), None),
    ).retrieval
    assert_equal_to_pml(r, theirs)
    assert (r.queries_scored, r.queries_without_relevant, r.queries_unseen_label) == (29, 1, 0)


@needs_pml
def test_every_query_left_out_gives_nan_like_pml():
    query, gallery = np.zeros((3, 2), np.float32), np.ones((4, 2), np.float32)
    theirs = pml(query, [5, 5, 6], gallery, [0, 0, 1, 1])
    r = ours(query, [5, 5, 6], exclude="none", gallery=(gallery, [0, 0, 1, 1], None, None))
    assert_equal_to_pml(r.retrieval, theirs)
    assert math.isnan(r.retrieval.precision_at_1) and r.retrieval.queries_unseen_label == 3
    assert r.pooled.accuracy == 0.0  # unseen classes still count as wrong predictions
    assert r.classes == [0, 1, 5, 6]


def test_the_issue_example_leaves_the_lone_query_out_of_every_metric():
    # [[0],[1],[5]], labels [0,0,1], k=1, leave-one-out: query 2 has no other class-1 item
    r = ours(np.array([[0.0], [1.0], [5.0]]), [0, 0, 1], exclude="self").retrieval
    assert (r.precision_at_1, r.map_at_r, r.queries_scored, r.queries_without_relevant) == (
        1.0,
        1.0,
        2,
        1,
    )
    assert r.per_class["precision_at_1"][0] == 1.0 and math.isnan(r.per_class["precision_at_1"][1])


@needs_pml
@needs_faiss
def test_nmi_and_ami_equal_pml_with_faiss_kmeans():
    emb, y, _, _ = knn_data(n=200, classes=5, seed=9)
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    theirs = AccuracyCalculator(include=("NMI", "AMI"), device=torch.device("cpu")).get_accuracy(
        torch.from_numpy(emb), torch.from_numpy(y)
    )
    c = evaluate_embeddings(emb, y, k=1, exclude="self").clustering
    assert (c.backend, c.n_clusters) == ("faiss", 5)
    assert c.nmi == pytest.approx(theirs["NMI"], abs=1e-12)
    assert c.ami == pytest.approx(theirs["AMI"], abs=1e-12)
    assert 0.2 < c.nmi < 1  # the data is clustered, not perfectly


def test_ranking_metrics_by_hand():
    # 1-D, leave-one-out, classes a a a b: for query 0 (at 0): neighbours 1 (a, at 1),
    # 3 (b, at 2), 2 (a, at 4); R = 2
    emb = np.array([[0.0], [1.0], [4.0], [2.0]])
    r = ours(emb, [0, 0, 0, 1], exclude="self", retrieval_k=None).retrieval
    q0 = {"p1": 1, "rp": 1 / 2, "map_r": (1 / 1) / 2, "map": (1 / 1 + 2 / 3) / 2, "mrr": 1}
    # query 1 (at 1): 0 (a, 1), 3 (b, 1) tie -> index 0 first, then 2 (a, 3): same as q0
    # query 2 (at 4): 3 (b, 2), 1 (a, 3), 0 (a, 4): AP@R = (1/2)/2, AP = (1/2 + 2/3)/2
    q2 = {"p1": 0, "rp": 1 / 2, "map_r": (1 / 2) / 2, "map": (1 / 2 + 2 / 3) / 2, "mrr": 1 / 2}
    mean = {key: (2 * q0[key] + q2[key]) / 3 for key in q0}  # query 3 (b) is left out
    assert r.queries_scored == 3
    assert r.precision_at_1 == pytest.approx(mean["p1"])
    assert r.r_precision == pytest.approx(mean["rp"])
    assert r.map_at_r == pytest.approx(mean["map_r"])
    assert r.mean_average_precision == pytest.approx(mean["map"])
    assert r.mean_reciprocal_rank == pytest.approx(mean["mrr"])


def test_retrieval_k_truncates_like_pml():
    emb = np.array([[0.0], [1.0], [4.0], [2.0]])
    r = ours(emb, [0, 0, 0, 1], exclude="self", retrieval_k=1).retrieval
    # K = 1: only the first neighbour counts; MAP divides by R = 2 still (PML's rule)
    assert r.r_precision == pytest.approx(2 / 3)
    assert r.mean_average_precision == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert r.mean_reciprocal_rank == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (1.5, ValueError), ("max", ValueError), (True, ValueError)]
)
def test_bad_retrieval_k_names_the_argument(bad, error):
    with pytest.raises(error, match="retrieval_k"):
        ours(np.eye(3), [0, 0, 1], exclude="self", retrieval_k=bad)


def test_mixed_label_kinds_are_refused():
    with pytest.raises(TypeError, match="gallery labels"):
        ours(np.eye(2), [0, 1], exclude="none", gallery=(np.eye(2), ["a", "b"], None, None))


def test_retrieval_metrics_by_hand():
    # 1-D points; classes a a b b; leave-one-out
    emb = np.array([[0.0], [1.0], [1.5], [10.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    r = evaluate_embeddings(emb, y, k=1, exclude="self", distance="l2", cross_magnification=False)
    # nearest: 0->1 (hit), 1->2 (miss), 2->1 (miss), 3->2 (hit)
    assert r.retrieval.precision_at_1 == 0.5
    # R = 1 for everyone: AP = hit at rank 1
    assert r.retrieval.map_at_r == 0.5
    assert r.pooled.accuracy == 0.5
    assert r.pooled.confusion == [[1, 1], [1, 1]]


def test_patient_level_differs_from_image_level():
    # patient A: 4 images, all right; patient B: 1 image, wrong -> image 4/5, patient (1+0)/2
    y = np.array([0, 0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0, 0])
    groups = np.array(["A", "A", "A", "A", "B"])
    r = evaluate_predictions(pred, y, groups)
    assert r.pooled.accuracy == pytest.approx(0.8)
    assert r.pooled.patient_accuracy == pytest.approx(0.5)
    assert r.pooled.balanced_accuracy == pytest.approx(0.5)  # recall 1.0 and 0.0
    assert r.pooled.precision == pytest.approx([0.8, 0.0])
    assert r.pooled.recall == pytest.approx([1.0, 0.0])
    assert r.pooled.f1 == pytest.approx([2 * 0.8 / 1.8, 0.0])
    assert r.pooled.confusion == [[4, 0], [1, 0]]


# PML 2.9.0's own accuracy-calculator cases on embeddings (tests/utils/
# test_calculate_accuracies.py), ported with their expected values.
def test_pml_case_reference_equal_to_queries():
    x, labels = np.arange(10.0)[:, None], np.arange(10)
    r = ours(x, labels, exclude="none", gallery=(x, labels, None, None), retrieval_k=None)
    assert set(r.retrieval.to_pml().values()) == {1.0}  # all five metrics


def test_pml_case_reference_holding_the_queries():
    """PML: reference = the 10 queries then 10 points between them, all of label 1;
    ref_includes_query. Only the query of label 1 has relevant items (R = 10)."""
    query, labels = np.arange(10.0)[:, None], np.arange(10)
    ref = (np.arange(20) / 2.0)[:, None]
    ref = np.concatenate([ref[::2], ref[1::2]])
    ref_labels = np.concatenate([labels, np.ones(10, dtype=int)])
    r = ours(
        query,
        labels,
        groups=np.arange(10),
        exclude="group",
        retrieval_k=None,
        gallery=(ref, ref_labels, np.arange(20), None),
    ).retrieval
    assert r.queries_scored == 1 and r.queries_without_relevant == 9
    assert r.precision_at_1 == 1.0 and r.r_precision == 0.5
    assert r.map_at_r == pytest.approx((1 + 2 / 2 + 3 / 5 + 4 / 7 + 5 / 9) / 10)
    # PML's expectation: the 10 relevant items at ranks 1, 2, 5, 7, ..., 19
    map_ = (1 + 2 / 2 + 3 / 5 + 4 / 7 + 5 / 9 + 6 / 11 + 7 / 13 + 8 / 15 + 9 / 17 + 10 / 19) / 10
    assert r.mean_average_precision == pytest.approx(map_)


def test_pml_case_tied_distances():
    # PML: "the skip-first-index approach might remove the wrong item"
    r = ours(np.array([[10.0], [10.0], [20.0], [20.0]]), [1, 0, 1, 0], exclude="self")
    assert r.retrieval.precision_at_1 == 0.0


def test_pml_case_many_tied_distances():
    """10^4 identical 2-D points, random labels, k = 1: the symmetric search path."""
    labels = np.random.default_rng(0).integers(0, 2, 10_000)
    r = ours(np.zeros((10_000, 2)), labels, exclude="self")
    assert r.retrieval.precision_at_1 == pytest.approx(0.5, rel=0.1)
    # ties by index: every row's nearest is row 0, row 0's is row 1
    assert r.retrieval.precision_at_1 == pytest.approx(
        ((labels == labels[0]).sum() - 1 + (labels[1] == labels[0])) / 10_000
    )


@needs_faiss
@pytest.mark.parametrize("offset", [0.5, 1.0])
def test_pml_case_mutual_information(offset):
    """PML: two Gaussian blobs; NMI and AMI within 10 % of scikit-learn's KMeans-based ones."""
    cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    emb = np.concatenate([rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32)) + offset])
    labels = np.repeat([0, 1], 2000)
    c = evaluate_embeddings(emb, labels, k=1, exclude="self", ranking=False).clustering
    km = cluster.KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(emb)
    assert c.ami == pytest.approx(metrics.adjusted_mutual_info_score(labels, km), rel=0.1)
    assert c.nmi == pytest.approx(metrics.normalized_mutual_info_score(labels, km), rel=0.1)
