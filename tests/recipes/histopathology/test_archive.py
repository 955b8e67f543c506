"""The archive's recipe side: the model's name follows its weights; search by case from
image files."""

from pathlib import Path

import pytest
import torch

from smse_metric.archive import EmbeddingStore
from smse_metric.recipes.histopathology.archive import (
    add_run_images,
    model_name,
    search_archive,
)
from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.evaluate import load_run
from smse_metric.recipes.histopathology.rundir import RunDir


def test_the_model_name_changes_with_the_weights(run):
    loaded = load_run(RunDir(run), "cpu")
    before = model_name(loaded)
    assert before == model_name(load_run(RunDir(run), "cpu"))  # the same weights
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1e-3)
    assert model_name(loaded) != before


def test_search_by_case_excludes_the_own_case_and_keeps_scales(run, root, tmp_path):
    archive = tmp_path / "a"
    done = add_run_images(archive, run, root, dtype="float32")
    assert done.result.added == len(EmbeddingStore(archive)) and not done.bad_images
    store = EmbeddingStore(archive)
    query = store.source[3]
    found = search_archive(archive, run, [query], cases=20, exclude_case=store.case[3])
    assert store.case[3] not in [c.case for c in found.cases]
    same = search_archive(archive, run, [query], k=5, scales="same")
    assert {p.scale for c in same.cases for p in c.patches} == {store.scale[3]}
    other = search_archive(archive, run, [query], k=5, scales="other")
    assert store.scale[3] not in {p.scale for c in other.cases for p in c.patches}
    # without an index: exact search, its own image first
    assert search_archive(archive, run, [query], k=1).cases[0].patches[0].row == 3
    png = tmp_path / "plain.png"
    png.write_bytes(Path(query).read_bytes())
    with pytest.raises(RecipeError, match="is not a BreakHis file name"):
        search_archive(archive, run, [png], scales="same")
