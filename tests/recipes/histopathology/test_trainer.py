"""The Trainer: its TrainState checkpoint, resume after Ctrl-C to the same result,
non-finite losses, history without duplicates, signal handlers, one line per epoch."""

import signal
import subprocess
import sys

import pytest
import torch
from recipe_helpers import TINY, history, interrupt_script

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.results import RunMetrics
from smse_metric.recipes.histopathology.splits import load_splits
from smse_metric.recipes.histopathology.training import train


@pytest.mark.parametrize("workers", [0, 2])  # workers draw batches ahead of the loop
def test_ctrl_c_saves_and_resume_reaches_the_same_result(root, tmp_path, capsys, workers):
    cfg = load_config("smse-triplet", TINY)
    cfg.optim.epochs = 3
    reference = train(cfg, tmp_path / "straight", root, quiet=True)

    out = tmp_path / "interrupted"
    child = subprocess.run(
        [sys.executable, "-c", interrupt_script(root, out, (1, 1), workers)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 130, child.stderr
    # the signal lands after step 1's callback: step 2 finishes, then the loop stops
    assert "interrupted at epoch 2 step 3" in child.stdout  # counted from 1, as printed
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
    assert strip == [
        {k: v for k, v in h.items() if k not in timing} for h in history(tmp_path / "straight")
    ]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(root, tmp_path, monkeypatch):
    from smse_metric.recipes.histopathology import loaders, trainer

    cfg = load_config("smse-triplet", TINY)
    train_set = loaders.make_datasets(cfg, load_splits(cfg, root)).train
    poison_at = len(loaders.train_loader(cfg, train_set)) + 2  # epoch 1, step 1
    real, calls = trainer.train_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == poison_at else loss

    monkeypatch.setattr(trainer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="epoch 2 step 2"):
        train(cfg, tmp_path / "run", root, quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_state"]["epoch"] == 1 and state["train_state"]["position"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


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
