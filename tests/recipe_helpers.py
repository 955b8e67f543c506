"""Shared by the recipe tests: the tiny configuration, a run's expected outputs and
checks, and a child process that interrupts itself."""

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smse_metric.evaluation import FaissIndex
from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.build import resolve_inputs
from smse_metric.recipes.histopathology.checkpoint import TrainState
from smse_metric.recipes.histopathology.data.breakhis import SUBTYPES
from smse_metric.recipes.histopathology.splits import MALIGNANT

TINY = {
    "data": {"synthetic": True, "image_size": [32, 32], "num_workers": 0, "val_fraction": 0.2},
    "sampler": {"groups_per_class": 2, "batch_size": 16},
    "model": {"embedding_dim": 16},
    "optim": {"epochs": 2},
    "run": {"device": "cpu", "amp": False, "deterministic": True},
}
OUTPUTS = (
    "config.toml",
    "history.jsonl",
    "metrics.json",
    "report.md",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "embeddings/gallery.npz",
    "embeddings/test.npz",
    "index/gallery.faiss",
    "plots/curves.png",
    "plots/confusion.png",
    "plots/cross_magnification.png",
    "plots/projection.png",
)


def history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def check_run(run, cfg):
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    records = history(run)
    assert [h["epoch"] for h in records] == list(range(cfg.optim.epochs))
    assert all(np.isfinite(h["loss"]) and 0 <= h["val_score"] <= 1 for h in records)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "sampler", "train_state"} <= set(last)
    assert TrainState.from_checkpoint(last).history == records
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert set(best) == {"model", "train_state"}  # weights only: the optimiser is in last.pt
    assert (run / ".smse-run").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == max(range(len(records)), key=lambda e: records[e]["val_score"])
    knn, head = metrics["test"]["knn"], metrics["test"]["head"]
    assert 0 <= knn["pooled"]["patient_accuracy"] <= 1 and len(knn["cross_magnification"]) == 4
    assert set(knn["per_scale"]) == {"40", "100", "200", "400"}
    assert 0 <= head["pooled"]["accuracy"] <= 1
    assert metrics["splits"]["test"] == knn["pooled"]["n"] and metrics["bad_images"] == []
    with np.load(run / "embeddings" / "test.npz") as emb:
        assert emb["embeddings"].shape == (metrics["splits"]["test"], cfg.model.embedding_dim)
        assert len(emb["paths"]) == len(emb["groups"]) == len(emb["magnifications"])
    assert FaissIndex.load(run / "index" / "gallery.faiss").ntotal == metrics["splits"]["train"]
    report = (run / "report.md").read_text()
    assert "| kNN | patient |" in report and "plots/projection.png" in report
    saved = load_config(run / "config.toml")
    assert Path(saved.data.path).is_dir()
    saved.data.path = cfg.data.path
    assert saved.data.classes == list(SUBTYPES) and saved.data.positive_classes == MALIGNANT
    saved.data.classes, saved.data.positive_classes = cfg.data.classes, cfg.data.positive_classes
    assert saved == resolve_inputs(cfg)  # the backbone's normalisation and classes, recorded


def interrupt_script(root, out, interrupt_at, workers=0):
    """A child process that trains and sends itself SIGINT after a given step."""
    return textwrap.dedent(f"""
        import os, signal, sys
        from smse_metric.recipes.histopathology import load_config
        from smse_metric.recipes.histopathology.training import TrainingInterrupted, train
        cfg = load_config("smse-triplet", {TINY!r})
        cfg.optim.epochs = 3
        cfg.data.num_workers = {workers}

        def on_step(s):
            if (s["epoch"], s["step"]) == {interrupt_at!r}:
                os.kill(os.getpid(), signal.SIGINT)

        try:
            train(cfg, {str(out)!r}, {str(root)!r}, on_step=on_step, quiet=True)
        except TrainingInterrupted as e:
            print(e)
            sys.exit(130)
        sys.exit(0)
    """)


def tiny_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 100, 150)).save(path)
