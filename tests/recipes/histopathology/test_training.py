"""Training end to end on a tiny synthetic BreakHis (CPU, seconds per run): outputs,
resume, interruption, DDP."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICES
from recipe_helpers import TINY, check_run, history, interrupt_script

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.evaluate import evaluate_run
from smse_metric.recipes.histopathology.results import RunMetrics
from smse_metric.recipes.histopathology.splits import load_splits
from smse_metric.recipes.histopathology.training import train


@pytest.mark.parametrize("device", DEVICES)
def test_trains_on_every_device_with_amp_and_reevaluates_on_the_cpu(root, tmp_path, device):
    """On CUDA: autocast, channels-last; the weights-only checkpoint re-evaluates on the
    CPU to the same split sizes."""
    run = {**TINY["run"], "device": device, "amp": True}
    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}, "run": run})
    metrics = train(cfg, tmp_path / "run", root, quiet=True)
    assert np.isfinite(history(tmp_path / "run")[0]["loss"])
    again = evaluate_run(tmp_path / "run", device="cpu")
    assert again.splits == metrics.splits
    assert again.test.knn.pooled.n == metrics.test.knn.pooled.n


def test_training_writes_every_output(run):
    check_run(run, load_config("smse-triplet", TINY))


def test_baseline_trains_and_selects_on_its_head(root, tmp_path):
    cfg = load_config("baseline-ce", {**TINY, "optim": {"epochs": 1}})
    metrics = train(cfg, tmp_path / "run", root, quiet=True)
    check_run(tmp_path / "run", cfg)
    assert metrics.selected_on == "validation head patient accuracy"
    assert metrics == RunMetrics.load(tmp_path / "run" / "metrics.json")  # what the file says
    assert history(tmp_path / "run")[0]["val_score"] == pytest.approx(
        history(tmp_path / "run")[0]["val_head_patient_accuracy"]
    )


def test_unreadable_images_are_left_out_and_listed(tmp_path):
    root = tmp_path / "data"
    make_synthetic_breakhis(root, images_per_magnification=2, image_size=(40, 28), seed=0)
    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}})
    splits = load_splits(cfg, root)
    victim = Path(splits.index.paths[int(np.flatnonzero(splits.train)[0])])
    victim.write_bytes(b"not a png")
    metrics = train(cfg, tmp_path / "run", root, quiet=True)
    assert [p for p, _ in metrics.bad_images] == [str(victim)]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "unreadable images left out: 1" in report and victim.name in report


def test_subtype_task_trains_with_eight_classes(root, tmp_path):
    data = {**TINY["data"], "task": "subtype"}
    with pytest.raises(ValueError, match=r"at least 2 patients of each class.*A: 1 training"):
        load_splits(load_config("smse-triplet", {**TINY, "data": data}), root)
    cfg = load_config("smse-triplet", {**TINY, "data": {**data, "small_validation": "warn"},
                                       "optim": {"epochs": 1}})  # fmt: skip
    with pytest.warns(UserWarning, match="at least 2 patients of each class"):
        metrics = train(cfg, tmp_path / "run", root, quiet=True)
    head = metrics.test.head.pooled
    assert len(head.confusion) == 8 and sum(map(sum, head.confusion)) == head.n
    report = (tmp_path / "run" / "report.md").read_text()
    assert "plots/confusion.png" in report


@pytest.mark.parametrize("workers", [0, 2])  # workers draw batches ahead of the loop
def test_ctrl_c_saves_and_resume_reaches_the_same_result(root, tmp_path, capsys, workers):
    cfg = load_config("smse-triplet", TINY)
    cfg.optim.epochs = 3
    reference = train(cfg, tmp_path / "straight", root, quiet=True)

    out = tmp_path / "interrupted"
    child = subprocess.run([sys.executable, "-c", interrupt_script(root, out, (1, 1), workers)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert child.returncode == 130, child.stderr
    # the signal lands after step 1's callback: step 2 finishes, then the loop stops
    assert "interrupted at epoch 1 step 2" in child.stdout
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["train_state"]["epoch"], state["train_state"]["position"]) == (1, 3)
    assert (state["sampler"]["epoch"], state["sampler"]["position"]) == (1, 3)  # not prefetch
    assert len(history(out)) == 1 and not (out / "metrics.json").exists()

    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "| kNN | patient |" in capsys.readouterr().out
    resumed = RunMetrics.load(out / "metrics.json")
    assert resumed.test == reference.test and resumed.best_epoch == reference.best_epoch
    timing = {"images_per_s", "seconds"}
    strip = [{k: v for k, v in h.items() if k not in timing} for h in history(out)]
    assert strip == [{k: v for k, v in h.items() if k not in timing}
                     for h in history(tmp_path / "straight")]  # fmt: skip


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(root, tmp_path, monkeypatch):
    from smse_metric.recipes.histopathology import build, trainer

    cfg = load_config("smse-triplet", TINY)
    train_set = build.make_datasets(cfg, load_splits(cfg, root))["train"]
    poison_at = len(build.train_loader(cfg, train_set)) + 2  # epoch 1, step 1
    real, calls = trainer.train_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == poison_at else loss

    monkeypatch.setattr(trainer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="epoch 1 step 1"):
        train(cfg, tmp_path / "run", root, quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_state"]["epoch"] == 1 and state["train_state"]["position"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_torchrun_trains_with_two_processes_and_only_rank_0_writes(root, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}})))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "smse_metric", "train", "--config", str(cfg), "--data", str(root),
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("wrote ") == 1 and "| kNN | patient |" in child.stdout
    check_run(out, load_config(cfg))


def test_training_restores_the_signal_handlers_and_determinism_flag(run):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not torch.are_deterministic_algorithms_enabled()  # the run asked for it


def test_history_has_no_duplicate_epoch_after_a_kill_anywhere(root, tmp_path, monkeypatch):
    """A kill after last.pt is written but before history.jsonl (the worst moment), then
    --resume: each epoch appears once."""
    from smse_metric.recipes.histopathology import trainer

    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 3}})
    out = tmp_path / "run"
    real = trainer._write_history

    def killed_after_epoch_1(path, history):
        if len(history) == 2:
            raise SystemExit("killed")  # last.pt of epoch 1 is on disk, the history is not
        real(path, history)

    monkeypatch.setattr(trainer, "_write_history", killed_after_epoch_1)
    with pytest.raises(SystemExit):
        train(cfg, out, root, quiet=True)
    assert [h["epoch"] for h in history(out)] == [0]
    monkeypatch.undo()
    train(cfg, out, root, resume=True, quiet=True)
    assert [h["epoch"] for h in history(out)] == [0, 1, 2]


def test_one_line_per_epoch_without_a_terminal(root, tmp_path, capsys):
    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 2}})
    train(cfg, tmp_path / "run", root)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data: train ") and "validation" in out[0] and "test" in out[0]
    epochs = [x for x in out if x.startswith("epoch ")]
    assert len(epochs) == 2 and all("img/s" in x and "loss" in x for x in epochs)


def test_torchrun_with_synthetic_data_rank_0_prepares_and_others_wait(tmp_path):
    cfg = tmp_path / "tiny.toml"
    tiny = {**TINY, "model": {"backbone": "smse-cnn", "embedding_dim": 8},
            "optim": {"epochs": 1}}  # fmt: skip
    cfg.write_text(config_to_toml(load_config("smse-triplet", tiny)))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node=2", "-m", "smse_metric", "train", "--config",
           str(cfg), "--synthetic", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "FutureWarning" not in child.stderr  # all_gather: no deprecated torch call
    assert child.stdout.count("wrote ") == 1 and (out / "data" / "Folds.csv").is_file()
    assert (out / ".smse-run").is_file() and (out / "metrics.json").is_file()
