"""Training several folds and their summary."""

import json

import numpy as np
import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main


def test_one_magnification_trains_reports_and_summarises_folds(root, tmp_path, capsys):
    one = {**TINY, "data": {**TINY["data"], "magnifications": [200]}, "optim": {"epochs": 1}}
    cfg = tmp_path / "one.toml"
    cfg.write_text(config_to_toml(load_config("smse-pair", one)))
    args = ["train", "--config", str(cfg), "--data", str(root)]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert "cross-magnification kNN mean: -" in capsys.readouterr().out  # nothing to cross
    metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert list(metrics["test"]["knn"]["per_scale"]) == ["200"]
    assert "off-diagonal mean: -." in (tmp_path / "single" / "report.md").read_text()
    out = tmp_path / "folds"
    assert main([*args, "--out", str(out), "--folds", "1-2"]) == 0
    assert json.loads((out / "folds.json").read_text())["cross_magnification_mean"] is None
    assert "cross-magnification" not in (out / "folds.md").read_text()


def test_cli_trains_several_folds_and_reports_mean_and_std(root, tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("baseline-ce", TINY)))
    out = tmp_path / "folds"
    args = [
        "train",
        "--config",
        str(cfg),
        "--data",
        str(root),
        "--out",
        str(out),
        "--folds",
        "1-2",
        "--epochs",
        "1",
    ]
    assert main(args) == 0
    assert "kNN cross-magnification mean" in capsys.readouterr().out
    per_fold = [json.loads((out / f"fold{k}" / "metrics.json").read_text()) for k in (1, 2)]
    assert [load_config(out / f"fold{k}" / "config.toml").data.fold for k in (1, 2)] == [1, 2]
    summary = json.loads((out / "folds.json").read_text())
    values = [m["test"]["head"]["pooled"]["patient_accuracy"] for m in per_fold]
    cell = summary["head"]["patient"]["pooled"]
    assert cell["values"] == values
    assert cell["mean"] == pytest.approx(np.mean(values))
    assert cell["std"] == pytest.approx(np.std(values, ddof=1))
    assert "+-" in (out / "folds.md").read_text()
    # finished folds are kept on --resume; the summary is rebuilt from them
    assert main(["train", "--out", str(out), "--folds", "1-2", "--resume"]) == 0
    assert json.loads((out / "folds.json").read_text()) == summary
    assert main([*args[:-2], "--folds", "2-1"]) == 2
    assert "--folds must be" in capsys.readouterr().err
