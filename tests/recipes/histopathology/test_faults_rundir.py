"""Fault suite, run directories: nothing lost, nothing mixed (issue 23's hostile-user
cases). Each test names what a user did; every refusal must leave the victim intact."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.rundir import RUN_MARKER
from smse_metric.recipes.histopathology.training import train

ONE_EPOCH = {**TINY, "optim": {"epochs": 1}, "run": {**TINY["run"], "deterministic": False}}
BENIGN = Path("BreaKHis_v1/histology_slides/breast/benign")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "D"
    make_synthetic_breakhis(path, images_per_magnification=1, image_size=(24, 16), seed=0)
    return path


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    return path


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("out", "marked", "overwrite"),
    [(BENIGN, True, False), (Path("BreaKHis_v1"), False, True), (Path("runs/a"), False, False)],
)
def test_a_run_inside_the_data_is_refused_marker_or_not(
    data, config, out, marked, overwrite, capsys
):
    before = _snapshot(data)
    if marked:
        (data / out / RUN_MARKER).write_text("")
        before = _snapshot(data)
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(data / out)]
    assert main(args + ["--overwrite"] * overwrite) == 2
    err = capsys.readouterr().err
    assert "lies inside the data" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(data) == before  # not one image gone, nothing added (runs/ included)
    assert not (data / "runs").exists()


def test_the_api_refuses_a_directory_it_did_not_create_and_the_data(tmp_path, data):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "thesis.tex").write_text("four years")
    cfg = load_config("smse-triplet", ONE_EPOCH)
    with pytest.raises(RecipeError, match="did not create"):
        train(cfg, proj, data, quiet=True)
    assert sorted(p.name for p in proj.iterdir()) == ["thesis.tex"]  # no marker planted
    assert main(["train", "--out", str(proj), "--overwrite", "--synthetic"]) == 2
    assert (proj / "thesis.tex").read_text() == "four years"
    with pytest.raises(RecipeError, match="lies inside the data"):
        train(cfg, data / "runs" / "a", data, quiet=True)
    with pytest.raises(RecipeError, match="is or holds the data"):
        train(cfg, data.parent, data, quiet=True)


def test_the_api_refuses_to_train_over_a_finished_run(tmp_path, data):
    cfg = load_config("smse-triplet", ONE_EPOCH)
    out = tmp_path / "run"
    train(cfg, out, data, quiet=True)
    history = (out / "history.jsonl").read_text()
    with pytest.raises(RecipeError, match="holds an earlier run"):
        train(cfg, out, data, quiet=True)
    assert (out / "history.jsonl").read_text() == history


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from smse_metric.recipes.histopathology.rundir import lock_run_dir
    with lock_run_dir(sys.argv[1]):
        Path(sys.argv[2]).write_text("held")
        time.sleep(120)
""")


def _hold_lock(run, tmp_path):
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(run), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.05)
    return child


def test_a_directory_another_live_run_holds_is_refused_and_a_dead_ones_lock_is_not(
    tmp_path, data, config, capsys
):
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
    child = _hold_lock(out, tmp_path)
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"in use by another smse-metric process (pid {child.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".smse-lock"]  # nothing written
    finally:
        child.kill()
        child.wait()
    assert main(args) == 0  # the dead holder's lock file is no obstacle
    metrics = (out / "metrics.json").read_text()
    for late in (["train", "--out", str(out), "--resume"], ["evaluate", "--run", str(out)]):
        child = _hold_lock(out, tmp_path)
        try:
            assert main(late) == 2
            assert "in use by another smse-metric process" in capsys.readouterr().err
        finally:
            child.kill()
            child.wait()
    assert (out / "metrics.json").read_text() == metrics


def test_nested_locks_in_one_process_share_it(tmp_path):
    from smse_metric.recipes.histopathology.rundir import lock_run_dir

    with lock_run_dir(tmp_path / "r"), lock_run_dir(tmp_path / "r"):
        pass
    with lock_run_dir(tmp_path / "r"):  # released: taken again
        pass


def test_synth_refuses_an_existing_dataset_and_a_negative_seed(data, tmp_path, capsys):
    before = _snapshot(data)
    assert main(["synth", str(data)]) == 2
    assert "not a new or empty directory" in capsys.readouterr().err
    assert _snapshot(data) == before
    assert main(["synth", str(tmp_path / "new"), "--seed", "-1"]) == 2
    assert "seed must be an integer >= 0" in capsys.readouterr().err


def test_evaluate_on_other_data_is_refused_and_a_moved_copy_agrees_with_search(
    tmp_path, data, config, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(out)]) == 0
    capsys.readouterr()
    saved = {
        n: (out / n).read_bytes() for n in ("metrics.json", "report.md", "embeddings/gallery.npz")
    }
    other = tmp_path / "other"
    make_synthetic_breakhis(other, images_per_magnification=1, image_size=(24, 16), seed=1)
    assert main(["evaluate", "--run", str(out), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not the run's dataset" in err and len(err.strip().splitlines()) == 1
    assert {n: (out / n).read_bytes() for n in saved} == saved
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    shutil.copytree(data, tmp_path / "moved")
    shutil.rmtree(data)
    assert main(["evaluate", "--run", "run", "--data", "moved"]) == 0
    with np.load(out / "embeddings" / "test.npz") as f:
        query = str(f["paths"][0])
        assert str(f["root"]) == str(tmp_path / "moved") and query.startswith(str(tmp_path))
    assert json.loads((out / "metrics.json").read_text())["splits"]
    for data_arg in ("moved", str(tmp_path / "moved")):  # search after evaluate --data
        assert main(["search", "--run", "run", query, "--data", data_arg, "-k", "2"]) == 0
        assert str(tmp_path / "moved") in capsys.readouterr().out


def test_overwrite_through_a_symlinked_out(tmp_path, data, config, capsys):
    real = tmp_path / "real"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(real)]
    assert main(args) == 0
    link = tmp_path / "link"
    os.symlink(real, link)
    args[-1] = str(link)
    assert main([*args, "--overwrite"]) == 0
    assert link.is_symlink() and (real / "metrics.json").is_file()


def test_data_at_the_filesystem_root_is_refused_before_any_walk(capsys):
    assert main(["train", "--data", "/", "--out", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err
    assert "refusing to scan /, the filesystem root" in err and len(err.strip().splitlines()) == 1


def test_a_relative_cache_dir_is_stored_absolute_and_found_from_elsewhere(
    tmp_path, data, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        "smse-triplet", {**ONE_EPOCH, "data": {**ONE_EPOCH["data"], "cache_dir": "cache"}}
    )
    train(cfg, tmp_path / "run", data, quiet=True)
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.data.cache_dir == str(tmp_path / "cache")
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--run", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == built  # no second cache
    assert not (elsewhere / "cache").exists()
