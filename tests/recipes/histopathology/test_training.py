"""Training end to end on a tiny synthetic BreakHis (CPU, seconds per run): outputs,
resume, interruption, DDP."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import DEVICES
from recipe_helpers import TINY, check_run, history

from smse_metric.recipes.histopathology import config_to_toml, load_config
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


@pytest.mark.parametrize("device", DEVICES)
def test_trains_from_the_decoded_cache_with_device_augmentation(root, tmp_path, device):
    """The cache is built once for the run's splits (train and gallery share one file);
    a second run with the same seed reuses it and repeats the first run's losses."""
    data = {**TINY["data"], "cache_dir": str(tmp_path / "cache"), "augment_on": "device"}
    run = {**TINY["run"], "device": device}
    cfg = load_config("smse-triplet", {**TINY, "data": data, "optim": {"epochs": 1}, "run": run})
    train(cfg, tmp_path / "a", root, quiet=True)
    files = sorted((tmp_path / "cache").iterdir())
    caches = [f for f in files if f.suffix == ".u8"]  # each with its digest, .u8.b2
    assert len(caches) == 3 and all(f.name.startswith("decoded-") for f in caches)
    assert sorted(f.name for f in files) == sorted(
        n for f in caches for n in (f.name, f"{f.name}.b2")
    )
    train(cfg, tmp_path / "b", root, quiet=True)
    assert sorted((tmp_path / "cache").iterdir()) == files
    first, second = history(tmp_path / "a"), history(tmp_path / "b")
    assert np.isfinite(first[0]["loss"])
    if device == "cpu":  # deterministic kernels
        assert first[0]["loss"] == second[0]["loss"]


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
    cfg = load_config(
        "smse-triplet",
        {**TINY, "data": {**data, "small_validation": "warn"}, "optim": {"epochs": 1}},
    )
    with pytest.warns(UserWarning, match="at least 2 patients of each class"):
        metrics = train(cfg, tmp_path / "run", root, quiet=True)
    head = metrics.test.head.pooled
    assert len(head.confusion) == 8 and sum(map(sum, head.confusion)) == head.n
    report = (tmp_path / "run" / "report.md").read_text()
    assert "plots/confusion.png" in report


def _torchrun(
    tmp_path,
    overrides: dict,
    nproc: int,
    *args: str,
    program=("-m", "smse_metric"),
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=NPROC PROGRAM train --config <TINY + overrides> ARGS``."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-triplet", {**TINY, **overrides})))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *program,
        "train",
        "--config",
        str(cfg),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_trains_with_two_processes_and_only_rank_0_writes(root, tmp_path):
    out = tmp_path / "ddp"
    child = _torchrun(tmp_path, {"optim": {"epochs": 1}}, 2, "--data", str(root), "--out", str(out))
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("wrote ") == 1 and "| kNN | patient |" in child.stdout
    check_run(out, load_config(tmp_path / "tiny.toml"))


def test_torchrun_with_synthetic_data_rank_0_prepares_and_others_wait(tmp_path):
    out = tmp_path / "ddp"
    tiny = {"model": {"backbone": "smse-cnn", "embedding_dim": 8}, "optim": {"epochs": 1}}
    child = _torchrun(tmp_path, tiny, 2, "--synthetic", "--out", str(out))
    assert child.returncode == 0, child.stderr[-3000:]
    assert "FutureWarning" not in child.stderr  # all_gather: no deprecated torch call
    assert child.stdout.count("wrote ") == 1 and (out / "data" / "Folds.csv").is_file()
    assert (out / ".smse-run").is_file() and (out / "metrics.json").is_file()


def test_torchrun_with_a_decoded_cache_finishes_and_scores_as_one_process(root, tmp_path):
    """Rank 0's final evaluation once entered the cache's collective alone and crashed
    ("Connection closed by peer", no metrics.json). Its scores must be those a single
    process gives the same checkpoint (the training itself differs from a 1-process run
    by design: each of W ranks takes its own batch, W batches a step)."""
    out = tmp_path / "ddp"
    cached = {
        "data": {**TINY["data"], "cache_dir": str(tmp_path / "cache")},
        "optim": {"epochs": 1},
    }
    child = _torchrun(tmp_path, cached, 2, "--data", str(root), "--out", str(out))
    assert child.returncode == 0, child.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    evaluate_run(out)  # one process, the same checkpoint and cache
    assert json.loads((out / "metrics.json").read_text()) == ddp
    # validation ran on both ranks, each embedding half: the best epoch's record is what
    # one process computes for the selected weights
    from smse_metric.recipes.histopathology.evaluate import evaluate_split, load_run
    from smse_metric.recipes.histopathology.loaders import make_datasets
    from smse_metric.recipes.histopathology.rundir import RunDir

    loaded = load_run(RunDir(out), "cpu")
    ds = make_datasets(loaded.cfg, load_splits(loaded.cfg, root), names=("gallery", "val"))
    val = evaluate_split(
        loaded.cfg, loaded.model, ds.gallery, ds.val, loaded.model.embed.weight.device
    )
    record = history(out)[ddp["best_epoch"]]
    assert record["val_patient_accuracy"] == val.knn.pooled.patient_accuracy
    assert record["val_head_accuracy"] == val.head.pooled.accuracy


def test_torchrun_with_more_ranks_than_batches_refuses_with_the_counts(root, tmp_path):
    """It once trained 0 steps an epoch on every rank, reported an untrained network and
    exited 0."""
    out = tmp_path / "ddp"
    few = {"sampler": {"groups_per_class": 8, "batch_size": 16}, "optim": {"epochs": 1}}
    child = _torchrun(tmp_path, few, 5, "--data", str(root), "--out", str(out))
    assert child.returncode != 0
    # torchrun ends the other ranks once the first one exits: some may not get to print
    ranks = [line for line in child.stderr.splitlines() if line.startswith("smse-metric train")]
    assert ranks and all("fewer than the 5 ranks" in line for line in ranks), child.stderr[-3000:]
    assert child.stderr.count("Traceback") == 1  # torchrun's own ChildFailedError, no rank's
    assert not (out / "metrics.json").exists()


_HANG = textwrap.dedent("""
    import os, signal, sys, time
    from smse_metric.recipes.histopathology import trainer
    from smse_metric.recipes.histopathology.cli import main

    step = trainer.Trainer._step

    def hung(self, *args, **kwargs):
        if os.environ["RANK"] == "1":  # a hung peer, which torchrun can still end
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(600)
        return step(self, *args, **kwargs)

    trainer.Trainer._step = hung
    sys.exit(main(sys.argv[1:]))
""")


def test_a_hung_rank_ends_the_run_after_run_dist_timeout_naming_it(root, tmp_path):
    """The other rank once waited silently for gloo's 30 minutes."""
    script = tmp_path / "hang.py"
    script.write_text(_HANG)
    hang = {"optim": {"epochs": 1}, "run": {**TINY["run"], "dist_timeout": 5.0}}
    child = _torchrun(
        tmp_path,
        hang,
        2,
        "--data",
        str(root),
        "--out",
        str(tmp_path / "ddp"),
        program=(str(script),),
        timeout=300,
    )
    assert child.returncode != 0
    line = [x for x in child.stderr.splitlines() if x.startswith("smse-metric train (rank 0)")]
    assert len(line) == 1 and "no answer from rank 1 within run.dist_timeout" in line[0], (
        child.stderr[-3000:]
    )
