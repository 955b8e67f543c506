"""The tiny synthetic BreakHis and one trained run, shared by the recipe tests."""

import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.training import train


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_synthetic_breakhis(path, images_per_magnification=2, image_size=(40, 28), seed=0)
    return path


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    """One trained smse-triplet run shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs") / "triplet"
    train(load_config("smse-triplet", TINY), out, root, quiet=True)
    return out
