"""Report helpers: the PCA projection and the error paths (plots are drawn by the
recipe tests, which check every file exists)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from smse_metric.recipes.histopathology.report import fold_summary, pca_2d, write_report
from smse_metric.recipes.histopathology.results import RunMetrics


@given(st.integers(3, 40), st.integers(2, 9), st.integers(0, 2**16))
def test_pca_matches_sklearn_up_to_sign(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)) * np.arange(1, d + 1)
    ours = pca_2d(x)
    ref = PCA(2, svd_solver="full").fit_transform(x)
    for j in range(2):
        assert np.allclose(np.abs(ours[:, j]), np.abs(ref[:, j]), atol=1e-8)


def test_pca_is_sign_stable_and_handles_one_dimension():
    x = np.random.default_rng(0).standard_normal((10, 4)) * [4, 3, 2, 1]
    # the axes are fixed by the data's geometry, not by the SVD's arbitrary signs:
    # mirroring the data mirrors the picture
    assert np.allclose(pca_2d(-x), -pca_2d(x))
    flat = pca_2d(np.arange(5.0)[:, None])
    assert flat.shape == (5, 2) and np.allclose(flat[:, 1], 0)
    with pytest.raises(ValueError, match="x must be"):
        pca_2d(np.zeros(3))


def test_errors_name_the_problem(tmp_path):
    metrics = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match=r"no metrics\.json"):
        RunMetrics.load(metrics)
    with pytest.raises(ValueError, match="per_fold is empty"):
        fold_summary({})
    metrics.write_text('{"best_epoch": 1}')  # an older or foreign file
    with pytest.raises(ValueError, match=r"not a metrics\.json of this version.*evaluate"):
        RunMetrics.load(metrics)


def test_the_report_renders_the_metrics_it_is_given(run, tmp_path):
    """From the object, not from files: the run's metrics with one number changed show
    the changed number, and the projection is drawn only from test points given."""
    import dataclasses

    metrics = RunMetrics.load(run / "metrics.json")
    metrics = dataclasses.replace(metrics, best_val_score=0.123456, bad_images=[["x.png", "bad"]])
    path = write_report(tmp_path, metrics, history=[])
    text = path.read_text()
    assert "0.123" in text and "`x.png`: bad" in text
    assert not (tmp_path / "plots" / "projection.png").exists()
    assert not (tmp_path / "plots" / "curves.png").exists()
    points = {
        "embeddings": np.random.default_rng(0).random((6, 4)),
        "labels": np.arange(6) % 2,
        "magnifications": np.repeat([40, 100], 3),
    }
    write_report(tmp_path, metrics, [{"epoch": 0, "loss": 1.0}], points)
    assert (tmp_path / "plots" / "projection.png").is_file()
    assert (tmp_path / "plots" / "curves.png").is_file()
