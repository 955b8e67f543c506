"""RunMetrics / SplitMetrics: metrics.json round-trips into the same typed results."""

import json

import numpy as np
import pytest

from smse_metric.evaluation import evaluate_embeddings, evaluate_predictions
from smse_metric.recipes.histopathology.results import RunMetrics, SplitMetrics


def _metrics():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    emb = rng.standard_normal((80, 4)) + 2 * labels[:, None]
    groups, scales = np.arange(80) // 4, np.tile([40, 100, 200, 400], 20)
    knn = evaluate_embeddings(emb, labels, groups, scales, k=3)
    head = evaluate_predictions(rng.integers(0, 2, 80), labels, groups, scales)
    splits = {"train": 60, "val": 10, "test": 80}
    return RunMetrics(
        3,
        "validation knn patient accuracy",
        0.875,
        SplitMetrics(knn, head),
        splits,
        {"images": 150},
        [["x.png", "bad"]],
    )


def test_metrics_json_round_trips(tmp_path):
    m = _metrics()
    m.save(tmp_path / "metrics.json")
    back = RunMetrics.load(tmp_path / "metrics.json")
    assert back == m
    assert back.test.knn.cross_magnification == m.test.knn.cross_magnification
    assert len(back.test.knn.cross_magnification) == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["knn"]["k"] == 3
    assert back.selected_predictor == "knn" and back.test.predictor("head") == m.test.head


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"has no metrics\.json"):
        RunMetrics.load(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not a metrics\.json of this version"):
        RunMetrics.load(tmp_path / "metrics.json")
    with pytest.raises(ValueError, match="predictor must be one of"):
        _metrics().test.predictor("svm")
