"""Run directories cannot eat data: every refusal leaves the victim files in place."""

import pytest

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.rundir import RUN_MARKER, check_run_dir, claim_run_dir

TINY = {
    "data": {"synthetic": True, "image_size": [16, 16], "num_workers": 0},
    "sampler": {"groups_per_class": 2},
    "model": {"backbone": "smse-cnn", "embedding_dim": 8},
    "optim": {"epochs": 1},
    "run": {"device": "cpu", "amp": False},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "data"
    make_synthetic_breakhis(path, images_per_magnification=1, image_size=(24, 16), seed=0)
    return path


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(config_to_toml(load_config("smse-triplet", TINY)))
    return path


def _victims(folder):
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "src" / "main.py").write_text("print('mine')\n")
    (folder / "README.md").write_text("my project\n")
    return [folder / "src" / "main.py", folder / "README.md"]


def _intact(files):
    return all(f.is_file() for f in files)


def test_overwrite_with_a_missing_data_dir_keeps_the_current_directory(
    tmp_path, monkeypatch, config, capsys
):
    victims = _victims(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", str(config), "--data", "/nonexistent", "--out", ".", "--overwrite"]
    assert main(args) == 2
    assert "--data /nonexistent is neither a directory nor a manifest" in capsys.readouterr().err
    assert _intact(victims)


def test_overwrite_never_removes_the_current_directory_even_with_a_marker(
    tmp_path, monkeypatch, config, data, capsys
):
    victims = _victims(tmp_path)
    (tmp_path / RUN_MARKER).write_text("")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_text("")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", str(config), "--data", str(data), "--out", ".", "--overwrite"]
    assert main(args) == 2
    assert "current directory" in capsys.readouterr().err
    assert _intact(victims)


@pytest.mark.parametrize("where", ["data", "parent"])
def test_out_that_is_or_holds_the_data_is_refused(tmp_path, config, where, capsys):
    data = tmp_path / "project" / "data"
    make_synthetic_breakhis(data, images_per_magnification=1, image_size=(24, 16), seed=0)
    images = sorted(data.rglob("*.png"))
    (data / RUN_MARKER).write_text("")  # even a marked one
    (data.parent / RUN_MARKER).write_text("")
    out = data if where == "data" else data.parent
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--overwrite"]
    assert main(args) == 2
    assert "is or holds the data" in capsys.readouterr().err
    assert _intact(images) and (data / "Folds.csv").is_file()


def test_a_directory_without_the_marker_is_never_replaced(tmp_path, config, data, capsys):
    out = tmp_path / "results"
    victims = _victims(out)
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
    assert main(args) == 2
    assert "holds files smse-metric did not create" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2
    assert "not created by smse-metric (no .smse-run file)" in capsys.readouterr().err
    assert _intact(victims)


def test_demo_refuses_the_current_directory_and_unmarked_ones(tmp_path, monkeypatch, capsys):
    victims = _victims(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", ".", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert main(["demo", "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "current directory" in err and "earlier demo" not in err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ".smse-run").write_text("")  # a run's marker is not a demo's
    (tmp_path / "old" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", "old"]) == 2
    assert "holds files smse-metric did not create" in capsys.readouterr().err
    assert main(["demo", "--out", "old", "--overwrite"]) == 2
    assert "no .smse-demo file" in capsys.readouterr().err
    assert _intact([*victims, tmp_path / "old" / "notes.txt"])


def test_a_marked_run_is_replaced_and_a_fresh_one_is_marked(tmp_path, config, data, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
    assert main(args) == 0
    assert (out / RUN_MARKER).is_file() and (out / "checkpoints" / "last.pt").is_file()
    (out / "stale.txt").write_text("from the first run")
    assert main(args) == 2
    assert "holds an earlier run; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "metrics.json").is_file()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(
    tmp_path, config, data, monkeypatch
):
    from smse_metric.recipes.histopathology import trainer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the first step")

    monkeypatch.setattr(trainer, "train_step", broken)
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
    with pytest.raises(RuntimeError, match="a bug in the first step"):
        main(args)
    assert not out.exists()
    synthetic = ["train", "--config", str(config), "--synthetic", "--out", str(out)]
    with pytest.raises(RuntimeError):
        main(synthetic)
    assert not out.exists()  # its synthetic data goes too: the run created it
    monkeypatch.undo()
    assert main(args) == 0  # the retry needs no --overwrite


def test_an_unfinished_marked_run_is_accepted_by_a_rerun(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_MARKER).write_text("")
    (out / "config.toml").write_text("")  # killed before its first checkpoint
    assert check_run_dir(out, overwrite=False) is True
    (out / "fold1" / "checkpoints").mkdir(parents=True)
    (out / "fold1" / "checkpoints" / "last.pt").write_text("")  # a fold finished: keep it
    with pytest.raises(ValueError, match="holds an earlier run"):
        check_run_dir(out, overwrite=False)


def test_claim_removes_only_what_it_created(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()  # existed before the run: left in place, marker removed
    with pytest.raises(KeyError), claim_run_dir(out, replace=False):
        raise KeyError("boom")
    assert out.is_dir() and not any(out.iterdir())
    victims = _victims(tmp_path / "theirs")
    with (
        pytest.raises(ValueError, match=r"no \.smse-run file"),
        claim_run_dir(tmp_path / "theirs", replace=True),
    ):
        pass
    assert _intact(victims)
