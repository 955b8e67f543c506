"""The smse-metric command line."""

import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main


def test_cli_train_refuses_an_existing_run_and_checks_flags(root, tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-pair", TINY)))
    args = [
        "train",
        "--config",
        str(cfg),
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "| kNN | patient |" in capsys.readouterr().out
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--config", "x"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x")]) == 2
    assert "--synthetic" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["synth", "train", "evaluate", "search", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: smse-metric {command}" in capsys.readouterr().out


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(
    tmp_path, root, monkeypatch, capsys
):
    config = tmp_path / "tiny.toml"
    config.write_text(config_to_toml(load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}})))
    from smse_metric.recipes.histopathology import trainer

    def buggy(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # not the user's fault

    monkeypatch.setattr(trainer, "train_step", buggy)
    args = ["train", "--config", str(config), "--data", str(root), "--out", str(tmp_path / "r")]
    with pytest.raises(ValueError, match="could not be broadcast"):
        main(args)  # raised, not turned into exit 2
    monkeypatch.undo()
    too_many = tmp_path / "too-many.toml"
    too_many.write_text(
        config.read_text().replace("classes_per_batch = 2", "classes_per_batch = 3")
    )
    assert main([*args[:2], str(too_many), *args[3:]]) == 2  # 2 classes in the data
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[sampler]" in err


def test_synth_writes_a_manifest_beside_its_tree_on_request(tmp_path, capsys):
    from smse_metric.recipes.histopathology.data import scan_breakhis
    from smse_metric.recipes.histopathology.data.manifest import read_manifest

    out = tmp_path / "data"
    size = ["--images-per-magnification", "1", "--width", "32", "--height", "24"]
    assert main(["synth", str(out), *size, "--manifest", "binary"]) == 0
    assert f"manifest: {out / 'manifest.csv'}" in capsys.readouterr().out
    m = read_manifest(out / "manifest.csv")
    assert m.class_names == ("benign", "malignant")
    assert len(m) == len(scan_breakhis(out))  # the manifest is beside the tree, not in it
    assert main(["synth", str(tmp_path / "plain"), *size]) == 0
    assert not (tmp_path / "plain" / "manifest.csv").exists()
