"""Report helpers: the PCA projection and the error paths (plots are drawn by the
recipe tests, which check every file exists)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from smse_metric.recipes.histopathology.report import fold_summary, pca_2d, write_report


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
    with pytest.raises(ValueError, match=r"no metrics\.json"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="per_fold is empty"):
        fold_summary({})
    (tmp_path / "metrics.json").write_text('{"best_epoch": 1}')  # an older or foreign file
    with pytest.raises(ValueError, match=r"not a metrics\.json of this version.*evaluate"):
        write_report(tmp_path)
