"""Saved embeddings: metadata written with them, moved data found, other data refused."""

import numpy as np
import pytest
import torch

from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.rundir import RunDir
from smse_metric.recipes.histopathology.saved import (
    check_same_data,
    relocated,
    save_embeddings,
    saved_root,
)


class _Images:
    """The attributes of a dataset that save_embeddings reads."""

    def __init__(self, root, names):
        from types import SimpleNamespace

        self.paths = [str(root / n) for n in names]
        for i, name in enumerate(names):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"x" * (i + 1))
        n = len(names)
        self.rows = np.arange(n)
        self.labels, self.scales = np.arange(n) % 2, np.full(n, 40)
        sub = SimpleNamespace(
            subtype=np.zeros(n, int),
            label=np.zeros(n, int),
            group=np.arange(n),
            group_names=names,
            subtype_names=("A",),
            label_names=("benign", "malignant"),
        )
        self.index = SimpleNamespace(subset=lambda rows: sub)


def test_saved_embeddings_survive_a_move_and_refuse_other_data(tmp_path):
    old, run = tmp_path / "old", RunDir(tmp_path / "run")
    ds = _Images(old, ["a/1.png", "b/2.png"])
    run.embeddings.mkdir(parents=True)
    emb = torch.randn(2, 3)
    for npz in (run.test_embeddings, run.gallery_embeddings):
        save_embeddings(npz, emb, ds, old)
    with np.load(run.test_embeddings) as f:
        assert np.array_equal(f["embeddings"], emb.numpy()) and list(f["sizes"]) == [1, 2]
    assert saved_root(run.test_embeddings, "/elsewhere") == old
    new = tmp_path / "new"
    old.rename(new)
    check_same_data(run, new, old)  # the same files under a new root: accepted
    assert relocated(ds.paths[1], old, new) == new / "b" / "2.png"
    (new / "b" / "2.png").write_bytes(b"other")
    with pytest.raises(RecipeError, match=r"b/2.png is missing or changed"):
        check_same_data(run, new, old)
    with pytest.raises(ValueError):
        relocated("/somewhere/else.png", old, new)
