"""Checkpoints: weights-only loading, atomic writes, clear errors."""

from pathlib import Path

import pytest
import torch

from smse_metric.recipes.histopathology.checkpoint import (
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.errors import RecipeError


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "truncated or not a torch checkpoint"),
        (None, "truncated or not a torch checkpoint"),  # the first half of a real one
        ("pickle", "objects other than tensors"),
    ],
)
def test_corrupt_or_hostile_checkpoints_give_one_clear_line(run, tmp_path, content, why, capsys):
    import pickle
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.pt"
    if content is None:
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif content == "pickle":
        best.write_bytes(pickle.dumps({"model": Path("x")}, protocol=2))  # an arbitrary object
    else:
        best.write_bytes(content)
    assert main(["evaluate", "--run", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(best) in err and why in err
    assert "weights_only=False" not in err


def test_a_checkpoint_round_trips_its_train_state_and_tensors(tmp_path):
    state = TrainState(epoch=3, position=2, best=0.75, best_epoch=1, history=[{"epoch": 0}])
    weights = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path / "last.pt", {"model": weights, "train_state": state.to_dict()})
    back = load_checkpoint(tmp_path / "last.pt")
    assert TrainState.from_checkpoint(back) == state
    assert torch.equal(back["model"]["w"], weights["w"])
    assert not (tmp_path / "last.pt.tmp").exists()
    with pytest.raises(RecipeError, match="no training state"):
        TrainState.from_checkpoint({"model": weights})
    with pytest.raises(RecipeError, match="does not fit"):
        TrainState.from_checkpoint({"train_state": {"epoch": 1, "unknown": 2}})
