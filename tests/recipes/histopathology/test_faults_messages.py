"""Fault suite, messages (issue 23): every fault a user meets ends with exit 2 (their
input) or 1 (the machine) and one line naming the file, key or rank, leaves no partial
file that blocks a retry, and says how to finish."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main

ONE_EPOCH = {**TINY, "optim": {"epochs": 1}}


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """A finished 1-epoch run, copied by the tests that change it."""
    base = tmp_path_factory.mktemp("faults")
    cfg = base / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    out = base / "run"
    assert main(["train", "--config", str(cfg), "--data", str(root), "--out", str(out)]) == 0
    return out


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_person_reads_epochs_from_1_and_scores_at_full_precision(trained, capsys):
    metrics = json.loads((trained / "metrics.json").read_text())
    history = [json.loads(x) for x in (trained / "history.jsonl").read_text().splitlines()]
    assert metrics["best_epoch"] == 0  # machine-read files count from 0
    assert metrics["best_val_score"] == history[0]["val_score"]  # not through float32
    assert "Best epoch 1 (" in (trained / "report.md").read_text()
    assert main(["evaluate", "--run", str(trained)]) == 0
    assert "best epoch 1 (" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("optim", {"lr": 0.01}, "optim.lr 0.001 -> 0.01"),
        ("model", {"embedding_dim": 8}, "model.embedding_dim 16 -> 8"),
        ("data", {"image_size": [40, 40]}, "data.image_size [32, 32] -> [40, 40]"),
        ("sampler", {"groups_per_class": 3}, "sampler.groups_per_class 2 -> 3"),
    ],
)
def test_resume_after_config_toml_changed_refuses_naming_the_keys(
    trained, tmp_path, key, value, shown, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = load_config(run / "config.toml", {key: value})
    (run / "config.toml").write_text(config_to_toml(cfg))
    last = (run / "checkpoints" / "last.pt").read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 2
    _one_line(capsys, "config.toml changed since the checkpoint", shown)
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


def test_resume_may_add_epochs(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert len((run / "history.jsonl").read_text().splitlines()) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["evaluate", "search"])
def test_a_missing_cuda_device_is_named_not_blamed_on_the_checkpoint(trained, command, capsys):
    args = [command, "--run", str(trained), "--device", "cuda"]
    if command == "search":
        with np.load(trained / "embeddings" / "test.npz") as f:
            args.append(str(f["paths"][0]))
    assert main(args) == 2
    _one_line(capsys, "--device cuda: no CUDA device is available here; use --device cpu")
    assert (trained / "checkpoints" / "best.pt").is_file()


def _weights_files(tmp_path):
    files = {"empty.pt": b"", "text.pt": b"not a checkpoint\n"}
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "good.pt")
    files["truncated.pt"] = (tmp_path / "good.pt").read_bytes()[:40]
    files["bad.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # a pickled object that is not a tensor: weights_only refuses it
    torch.save({"state_dict": {"w": PurePosixPath("x")}}, tmp_path / "pickle.pt")
    return [*files, "pickle.pt"]


def test_bad_weights_files_are_named_in_one_line(root, tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    for name in _weights_files(tmp_path):
        args = [
            "train",
            "--config",
            str(cfg),
            "--data",
            str(root),
            "--out",
            str(tmp_path / "run"),
            "--weights",
            str(tmp_path / name),
        ]
        assert main(args) == 2, name
        _one_line(capsys, f"weights file {tmp_path / name}")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"", b"text, not a checkpoint\n"])
def test_a_bad_best_pt_is_named_in_one_line(trained, tmp_path, content, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "best.pt").write_bytes(content)
    assert main(["evaluate", "--run", str(run)]) == 2
    _one_line(capsys, "best.pt is truncated or not a torch checkpoint")


def _bomb(path, size=(12_000, 9_000)):
    Image.new("1", size).save(path)  # 108 megapixels in a few KB
    return path


def test_a_decompression_bomb_is_refused_as_a_query_and_skipped_in_the_data(
    trained, root, tmp_path, capsys
):
    bomb = _bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    assert main(["search", "--run", str(trained), str(bomb)]) == 2
    _one_line(capsys, "12000 x 9000 pixels, over the limit of 89478485 (data.max_image_pixels)")
    data = tmp_path / "data"
    shutil.copytree(root, data)
    victim = sorted(data.rglob("*-40-001.png"))[0]
    _bomb(victim)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(out)]) == 0
    bad = json.loads((out / "metrics.json").read_text())["bad_images"]
    assert [p for p, _ in bad] == [str(victim)] and "over the limit" in bad[0][1]


def test_a_full_disk_leaves_no_partial_checkpoint_and_says_how_to_go_on(
    root, tmp_path, monkeypatch, capsys
):
    from smse_metric.recipes.histopathology import checkpoint

    real = torch.save

    def full(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)  # a partial file, then torch's own error
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(root), "--out", str(out)]) == 1
    _one_line(capsys, "cannot write", "MiB free on its disk", "unexpected pos 64")
    assert not list(out.rglob("*.tmp"))


def test_a_full_disk_during_the_final_evaluation_says_evaluate_finishes_it(
    root, tmp_path, monkeypatch, capsys
):
    from smse_metric.recipes.histopathology import evaluate

    real = np.savez

    def full(path, **arrays):
        real(path, **arrays)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate.np, "savez", full)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(root), "--out", str(out)]) == 1
    _one_line(capsys, "No space left on device", f"smse-metric evaluate --run {out} finishes")
    assert not (out / "embeddings" / "gallery.npz").exists()  # never a partial one
    assert not list(out.rglob("*.tmp.npz"))
    monkeypatch.undo()
    assert main(["evaluate", "--run", str(out)]) == 0 and (out / "metrics.json").is_file()


def test_a_non_finite_loss_before_any_checkpoint_says_so(root, tmp_path, monkeypatch, capsys):
    from smse_metric.recipes.histopathology import trainer

    monkeypatch.setattr(trainer.Trainer, "_step", lambda self, *a, **k: (float("nan"), False))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", ONE_EPOCH)))
    args = ["train", "--config", str(cfg), "--data", str(root), "--out", str(tmp_path / "r")]
    assert main(args) == 1
    _one_line(
        capsys,
        "non-finite loss (nan) at epoch 1 step 1",
        "no epoch finished, so there is no checkpoint",
    )


def test_search_distances_are_never_negative(trained, monkeypatch):
    from smse_metric.recipes.histopathology import search

    make = search.make_index

    def rounding(*args, **kwargs):  # 1 - cos of a duplicate rounds below 0 on some backends
        # a query embedded alone differs from its batched gallery row by float rounding
        # (up to ~2e-7 on the CPU, with the conv kernels a batch of one takes), so the
        # shift is larger than that: the self-match must reach the clamp negative
        index = make(*args, **kwargs)
        plain = index.search
        index.search = lambda q, k: (lambda d, i: (d - 1e-6, i))(*plain(q, k))
        return index

    monkeypatch.setattr(search, "make_index", rounding)
    with np.load(trained / "embeddings" / "gallery.npz") as f:
        query = str(f["paths"][0])
    found = search.search_run(trained, query, k=3)
    assert found[0].path == query and found[0].distance == 0.0
    assert all(n.distance >= 0 for n in found)


def test_demo_help_shows_a_plain_percent_sign():
    out = subprocess.run(
        [sys.executable, "-m", "smse_metric", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "95% confidence" in out.replace("\n", " ") and "%%" not in out


def test_knn_classifier_predict_before_fit_names_fit():
    from smse_metric.evaluation import KNNClassifier

    with pytest.raises(ValueError, match=r"not fitted yet: call fit"):
        KNNClassifier().predict(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("command", ["train", "evaluate", "search"])
def test_a_read_only_run_directory_is_one_line(
    trained, root, tmp_path, command, monkeypatch, capsys
):
    """Tests run as root, whom permissions do not stop: every write the command makes
    fails as it would for a user."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and str(path).startswith(str(run)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    real_os_open = os.open

    def os_read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(run)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(os, "open", os_read_only)
    with np.load(run / "embeddings" / "test.npz") as f:
        query = str(f["paths"][0])
    args = {
        "train": ["train", "--out", str(run), "--resume", "--epochs", "2"],
        "evaluate": ["evaluate", "--run", str(run)],
        "search": ["search", "--run", str(run), query],
    }[command]
    assert main(args) in (1, 2)
    _one_line(capsys, str(run), "Permission denied")
