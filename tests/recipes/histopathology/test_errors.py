"""RecipeError marks what the user gave wrong (the CLI prints it in one line, exit 2);
each recipe entry point raises it for bad input, and it is a ValueError."""

import pytest

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.checkpoint import load_checkpoint
from smse_metric.recipes.histopathology.data import load_folds, scan_breakhis
from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.results import RunMetrics
from smse_metric.recipes.histopathology.search import search_run


@pytest.mark.parametrize(
    "call",
    [
        lambda p: load_config("no-such-preset"),
        lambda p: load_config(overrides={"optim": {"lr": -1.0}}),
        lambda p: scan_breakhis(p / "missing"),
        lambda p: load_folds(p / "Folds.csv", 1),
        lambda p: load_checkpoint(p / "last.pt"),
        lambda p: RunMetrics.load(p / "metrics.json"),
        lambda p: search_run(p, p / "query.png"),
    ],
)
def test_user_errors_are_recipe_errors(call, tmp_path):
    assert issubclass(RecipeError, ValueError)
    with pytest.raises(RecipeError):
        call(tmp_path)
