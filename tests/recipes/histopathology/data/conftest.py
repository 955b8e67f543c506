"""A small synthetic BreakHis tree and its scan, shared by the data tests."""

import pytest

from smse_metric.recipes.histopathology.data import make_synthetic_breakhis, scan_breakhis


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_breakhis(root, images_per_magnification=2, image_size=(32, 24), seed=3)
    return root


@pytest.fixture(scope="module")
def synth_index(synth):
    return scan_breakhis(synth)
