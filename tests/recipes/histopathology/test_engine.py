"""Checkpoints: weights-only loading and clear errors."""

from pathlib import Path

import pytest

from smse_metric.recipes.histopathology.cli import main


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
