"""Retrieval and classification metrics by hand and against PML."""

import numpy as np
import pytest
import torch
from helpers import knn_data, needs_pml

from smse_metric import (
    evaluate_embeddings,
    evaluate_predictions,
)


@needs_pml
def test_map_at_r_and_precision_at_1_equal_pml():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, y, _, _ = knn_data(n=150, seed=5)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              k="max_bin_count")  # fmt: skip
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for metric, pml_input in (("l2", emb), ("cosine", unit)):
        theirs = calc.get_accuracy(torch.from_numpy(pml_input), torch.from_numpy(y))
        r = evaluate_embeddings(emb, y, k=5, exclude="self", metric=metric)
        assert r.retrieval.precision_at_1 == pytest.approx(theirs["precision_at_1"], abs=1e-6)
        assert r.retrieval.map_at_r == pytest.approx(
            theirs["mean_average_precision_at_r"], abs=1e-6
        )


def test_retrieval_metrics_by_hand():
    # 1-D points; classes a a b b; leave-one-out
    emb = np.array([[0.0], [1.0], [1.5], [10.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    r = evaluate_embeddings(emb, y, k=1, exclude="self", metric="l2", cross_magnification=False)
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
