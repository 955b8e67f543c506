"""The SMSE recipe end to end on a tiny synthetic BreakHis (CPU, seconds)."""

import json

import numpy as np
import pytest
import torch

from smse_metric.data import make_synthetic_breakhis
from smse_metric.recipes import load_config
from smse_metric.recipes.breakhis import load_splits, train

TINY = {
    "data": {"synthetic": True, "image_size": [32, 32], "num_workers": 0, "val_fraction": 0.2},
    "sampler": {"groups_per_class": 2, "batch_size": 16},
    "model": {"embedding_dim": 16},
    "optim": {"epochs": 2},
    "run": {"device": "cpu", "amp": False},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_synthetic_breakhis(path, images_per_magnification=2, image_size=(40, 28), seed=0)
    return path


def test_splits_are_patient_disjoint_with_validation_from_training(root):
    s = load_splits(load_config("smse-triplet", TINY), root)
    assert not (s.train & s.val).any() and not (s.train & s.test).any()
    assert s.val.any() and s.test.any()
    for a, b in ((s.train, s.val), (s.train, s.test), (s.val, s.test)):
        assert not set(s.index.group[a]) & set(s.index.group[b])


@pytest.mark.parametrize("preset", ["smse-triplet", "baseline-ce"])
def test_training_writes_every_output(root, tmp_path, preset):
    metrics = train(load_config(preset, TINY), tmp_path / "run", root)
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(np.isfinite(h["loss"]) and 0 <= h["val_patient_accuracy"] <= 1 for h in history)
    for name in ("last", "best"):
        state = torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)
        assert {"model", "optimizer", "epoch"} <= set(state)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["best_epoch"] == metrics["best_epoch"] in (0, 1)
    knn, head = saved["test"]["knn"], saved["test"]["head"]
    assert 0 <= knn["pooled"]["patient_accuracy"] <= 1 and knn["cross_scale"] is not None
    assert set(knn["per_scale"]) == {"40", "100", "200", "400"}
    assert 0 <= head["pooled"]["accuracy"] <= 1
    assert load_config(run / "config.toml") == load_config(preset, TINY)


def test_cli_train_runs_and_refuses_to_overwrite(root, tmp_path, capsys):
    from smse_metric.cli import main
    from smse_metric.recipes import config_to_toml

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-pair", TINY)))
    args = ["train", "--config", str(cfg), "--data", str(root), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test kNN:" in out and (tmp_path / "run" / "metrics.json").is_file()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("command", ["synth", "train"])
def test_every_subcommand_has_help(command, capsys):
    from smse_metric.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: smse-metric" in capsys.readouterr().out
