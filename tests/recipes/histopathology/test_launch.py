"""Launching a run: inputs resolved and objects built once, then handed on."""

import collections

import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import inputs, load_config, splits
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import dataset
from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.launch import launch, resume_config
from smse_metric.recipes.histopathology.rundir import RunDir


def _count_work(monkeypatch) -> collections.Counter:
    """Counts of backbones built, data scans, datasets made and images verified."""
    import timm
    from PIL import PngImagePlugin

    counts: collections.Counter = collections.Counter()

    def counting(key, fn, per_arg=False):
        def wrapper(*args, **kwargs):
            counts[(key, str(getattr(args[0], "filename", ""))) if per_arg else key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(timm, "create_model", counting("backbone", timm.create_model))
    assert not hasattr(inputs, "scan_breakhis")  # every scan starts from splits.scan_data
    monkeypatch.setattr(splits, "scan_breakhis", counting("scan", splits.scan_breakhis))
    init = dataset.BreakHisDataset.__init__
    monkeypatch.setattr(dataset.BreakHisDataset, "__init__", counting("dataset", init))
    verify = PngImagePlugin.PngImageFile.verify
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", counting("verify", verify, True))
    return counts


def test_one_train_run_builds_scans_and_verifies_once(tmp_path, monkeypatch, capsys):
    """From the CLI to metrics.json: one backbone, one scan of the data, the four
    datasets once each, every image verified at most once (the evaluation reuses what
    training built)."""
    counts = _count_work(monkeypatch)
    config = tmp_path / "tiny.toml"
    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}})
    from smse_metric.recipes.histopathology import config_to_toml

    config.write_text(config_to_toml(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--synthetic", "--out", str(out)]) == 0
    assert RunDir(out).metrics.is_file() and RunDir(out).report.is_file()
    verified = {k: n for k, n in counts.items() if isinstance(k, tuple)}
    assert counts["backbone"] == 1
    assert counts["scan"] == 1
    assert counts["dataset"] == 4
    assert verified and max(verified.values()) == 1  # skip_bad_images checks each once


def test_folds_share_one_scan_and_their_checks_come_first(tmp_path, root, monkeypatch):
    """Every fold's splits are checked before anything is written, from one scan."""
    counts = _count_work(monkeypatch)
    cfg = load_config(
        "smse-triplet", {**TINY, "data": {**TINY["data"], "folds_file": str(tmp_path / "no")}}
    )
    with pytest.raises(RecipeError, match=r"folds_file .* does not exist"):
        launch(cfg, tmp_path / "run", root=root, folds=[1, 2], quiet=True)
    assert not (tmp_path / "run").exists()
    assert counts["scan"] == 1 and counts["backbone"] == 1 and counts["dataset"] == 0


def test_resume_needs_a_last_checkpoint(tmp_path):
    with pytest.raises(RecipeError, match=r"no checkpoints/last\.pt to resume from"):
        resume_config(tmp_path)
    with pytest.raises(RecipeError, match=r"no checkpoints/last\.pt"):
        resume_config(tmp_path, folds=[1, 2])
