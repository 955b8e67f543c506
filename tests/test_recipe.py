"""The SMSE recipe end to end on a tiny synthetic BreakHis (CPU, seconds per run)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from smse_metric.evaluation import FaissIndex
from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.build import resolve_inputs
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.engine import TrainState
from smse_metric.recipes.histopathology.results import RunMetrics
from smse_metric.recipes.histopathology.splits import load_splits
from smse_metric.recipes.histopathology.training import train

TINY = {
    "data": {"synthetic": True, "image_size": [32, 32], "num_workers": 0, "val_fraction": 0.2},
    "sampler": {"groups_per_class": 2, "batch_size": 16},
    "model": {"embedding_dim": 16},
    "optim": {"epochs": 2},
    "run": {"device": "cpu", "amp": False, "deterministic": True},
}
OUTPUTS = (
    "config.toml", "history.jsonl", "metrics.json", "report.md", "checkpoints/last.pt",
    "checkpoints/best.pt", "embeddings/gallery.npz", "embeddings/test.npz",
    "index/gallery.faiss", "plots/curves.png", "plots/confusion.png",
    "plots/cross_magnification.png", "plots/projection.png",
)  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_synthetic_breakhis(path, images_per_magnification=2, image_size=(40, 28), seed=0)
    return path


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    """One trained smse-triplet run shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs") / "triplet"
    train(load_config("smse-triplet", TINY), out, root, quiet=True)
    return out


def _history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_splits_are_patient_disjoint_with_validation_from_training(root):
    s = load_splits(load_config("smse-triplet", TINY), root)
    assert not (s.train & s.val).any() and not (s.train & s.test).any()
    assert s.val.any() and s.test.any()
    for a, b in ((s.train, s.val), (s.train, s.test), (s.val, s.test)):
        assert not set(s.index.group[a]) & set(s.index.group[b])


def test_fold_files_by_pattern_match_folds_csv(root, tmp_path):
    import csv

    with open(root / "Folds.csv") as f:
        rows = list(csv.DictReader(f))
    for k in (1, 2):
        lines = [f"{Path(r['filename']).name}|{r['mag']}|{k}|{r['grp']}"
                 for r in rows if int(r["fold"]) == k]  # fmt: skip
        (tmp_path / f"dsfold{k}.txt").write_text("\n".join(lines) + "\n")
    for k in (1, 2):
        csv_cfg = load_config("smse-triplet", {**TINY, "data": {**TINY["data"], "fold": k}})
        ds_cfg = load_config(
            "smse-triplet",
            {
                **TINY,
                "data": {
                    **TINY["data"],
                    "fold": k,
                    "folds_file": str(tmp_path / "dsfold{fold}.txt"),
                },
            },
        )
        a, b = load_splits(csv_cfg, root), load_splits(ds_cfg, root)
        assert (a.test == b.test).all() and (a.train == b.train).all()
    ds_cfg.data.fold = 3
    with pytest.raises(ValueError, match=r"dsfold3\.txt does not exist"):
        load_splits(ds_cfg, root)


def _check_run(run, cfg):
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    history = _history(run)
    assert [h["epoch"] for h in history] == list(range(cfg.optim.epochs))
    assert all(np.isfinite(h["loss"]) and 0 <= h["val_score"] <= 1 for h in history)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "sampler", "train_state"} <= set(last)
    assert TrainState.from_checkpoint(last).history == history
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert set(best) == {"model", "train_state"}  # weights only: the optimiser is in last.pt
    assert (run / ".smse-run").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == max(range(len(history)), key=lambda e: history[e]["val_score"])
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
    assert saved == resolve_inputs(cfg)  # the backbone's normalisation, recorded


def test_training_writes_every_output(run):
    _check_run(run, load_config("smse-triplet", TINY))


def test_baseline_trains_and_selects_on_its_head(root, tmp_path):
    cfg = load_config("baseline-ce", {**TINY, "optim": {"epochs": 1}})
    metrics = train(cfg, tmp_path / "run", root, quiet=True)
    _check_run(tmp_path / "run", cfg)
    assert metrics.selected_on == "validation head patient accuracy"
    assert metrics == RunMetrics.load(tmp_path / "run" / "metrics.json")  # what the file says
    assert _history(tmp_path / "run")[0]["val_score"] == pytest.approx(
        _history(tmp_path / "run")[0]["val_head_patient_accuracy"]
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


def test_one_magnification_trains_reports_and_summarises_folds(root, tmp_path, capsys):
    one = {**TINY, "data": {**TINY["data"], "magnifications": [200]}, "optim": {"epochs": 1}}
    cfg = tmp_path / "one.toml"
    cfg.write_text(config_to_toml(load_config("smse-pair", one)))
    args = ["train", "--config", str(cfg), "--data", str(root)]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert "cross-magnification kNN mean: -" in capsys.readouterr().out  # nothing to cross
    metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert list(metrics["test"]["knn"]["per_scale"]) == ["200"]
    assert "off-diagonal mean: -." in (tmp_path / "single" / "report.md").read_text()
    out = tmp_path / "folds"
    assert main([*args, "--out", str(out), "--folds", "1-2"]) == 0
    assert json.loads((out / "folds.json").read_text())["cross_magnification_mean"] is None
    assert "cross-magnification" not in (out / "folds.md").read_text()


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


def test_evaluate_reproduces_the_metrics(run, capsys):
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text()) == before
    assert "| kNN | patient |" in capsys.readouterr().out


def test_search_returns_k_neighbours_with_metadata(run, root, capsys, monkeypatch):
    from smse_metric.recipes.histopathology.search import search_run

    with np.load(run / "embeddings" / "test.npz") as emb:
        query = str(emb["paths"][0])
    found = search_run(run, query, k=3)
    assert [n.rank for n in found] == [1, 2, 3]
    assert all(a.distance <= b.distance for a, b in itertools.pairwise(found))
    with np.load(run / "embeddings" / "gallery.npz") as g:
        gallery = dict(zip(g["paths"].tolist(), g["groups"].tolist(), strict=True))
    for n in found:
        assert gallery[n.path] == n.patient and n.magnification in (40, 100, 200, 400)
        assert n.label == ("malignant" if n.subtype in ("DC", "LC", "MC", "PC") else "benign")
    sheet = run / "sheet.png"
    assert main(["search", "--run", str(run), query, "-k", "2", "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert sheet.is_file() and found[0].path in out and found[1].path in out
    with pytest.raises(ValueError, match="k must be"):
        search_run(run, query, k=0)
    monkeypatch.setitem(sys.modules, "faiss", None)  # [recipe] without faiss: torch search
    assert [(n.path, n.rank) for n in search_run(run, query, k=3)] == [
        (n.path, n.rank) for n in found
    ]
    bad = run / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        search_run(run, bad)


def _script(root, out, interrupt_at, workers=0):
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


@pytest.mark.parametrize("workers", [0, 2])  # workers draw batches ahead of the loop
def test_ctrl_c_saves_and_resume_reaches_the_same_result(root, tmp_path, capsys, workers):
    cfg = load_config("smse-triplet", TINY)
    cfg.optim.epochs = 3
    reference = train(cfg, tmp_path / "straight", root, quiet=True)

    out = tmp_path / "interrupted"
    child = subprocess.run([sys.executable, "-c", _script(root, out, (1, 1), workers)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert child.returncode == 130, child.stderr
    # the signal lands after step 1's callback: step 2 finishes, then the loop stops
    assert "interrupted at epoch 1 step 2" in child.stdout
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["train_state"]["epoch"], state["train_state"]["position"]) == (1, 3)
    assert (state["sampler"]["epoch"], state["sampler"]["position"]) == (1, 3)  # not prefetch
    assert len(_history(out)) == 1 and not (out / "metrics.json").exists()

    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "| kNN | patient |" in capsys.readouterr().out
    resumed = RunMetrics.load(out / "metrics.json")
    assert resumed.test == reference.test and resumed.best_epoch == reference.best_epoch
    timing = {"images_per_s", "seconds"}
    strip = [{k: v for k, v in h.items() if k not in timing} for h in _history(out)]
    assert strip == [{k: v for k, v in h.items() if k not in timing}
                     for h in _history(tmp_path / "straight")]  # fmt: skip


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


def test_cli_train_refuses_an_existing_run_and_checks_flags(root, tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("smse-pair", TINY)))
    args = ["train", "--config", str(cfg), "--data", str(root), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--device", "cpu"]  # fmt: skip
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


def test_cli_trains_several_folds_and_reports_mean_and_std(root, tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(config_to_toml(load_config("baseline-ce", TINY)))
    out = tmp_path / "folds"
    args = ["train", "--config", str(cfg), "--data", str(root), "--out", str(out),
            "--folds", "1-2", "--epochs", "1"]  # fmt: skip
    assert main(args) == 0
    assert "kNN cross-magnification mean" in capsys.readouterr().out
    per_fold = [json.loads((out / f"fold{k}" / "metrics.json").read_text()) for k in (1, 2)]
    assert [load_config(out / f"fold{k}" / "config.toml").data.fold for k in (1, 2)] == [1, 2]
    summary = json.loads((out / "folds.json").read_text())
    values = [m["test"]["head"]["pooled"]["patient_accuracy"] for m in per_fold]
    cell = summary["head"]["patient"]["pooled"]
    assert cell["values"] == values
    assert cell["mean"] == pytest.approx(np.mean(values))
    assert cell["std"] == pytest.approx(np.std(values, ddof=1))
    assert "+-" in (out / "folds.md").read_text()
    # finished folds are kept on --resume; the summary is rebuilt from them
    assert main(["train", "--out", str(out), "--folds", "1-2", "--resume"]) == 0
    assert json.loads((out / "folds.json").read_text()) == summary
    assert main([*args[:-2], "--folds", "2-1"]) == 2
    assert "--folds must be" in capsys.readouterr().err


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
    _check_run(out, load_config(cfg))


@pytest.mark.parametrize("command", ["synth", "train", "evaluate", "search", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: smse-metric {command}" in capsys.readouterr().out


def test_demo_compares_paired_replicates_with_a_confidence_interval(tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    from smse_metric.recipes.histopathology import demo
    from smse_metric.recipes.histopathology.compare import paired_comparison

    monkeypatch.setattr(demo, "DEMO_PATIENTS", {k: 2 * v for k, v in
                                                demo.DEFAULT_PATIENTS.items()})  # fmt: skip
    tiny = {**demo.DEMO_OVERRIDES, "optim": {**demo.DEMO_OVERRIDES["optim"], "epochs": 1},
            "sampler": {"groups_per_class": 2}}  # fmt: skip
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", tiny)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    cells = [[v.strip() for v in r.strip("|").split("|")] for r in printed.splitlines()
             if r.startswith("| ")]  # fmt: skip
    rows = {c[0]: c for c in cells}
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 2 and all(set(r) == set(demo.DEMO_METHODS) for r in runs)
    # the printed numbers are recomputed here from the per-replicate test metrics
    a = [r["smse-triplet"]["knn"]["pooled"]["patient_accuracy"] for r in runs]
    b = [r["baseline-ce"]["head"]["pooled"]["patient_accuracy"] for r in runs]
    c = paired_comparison(a, b)
    row = rows["pooled patient accuracy"]
    assert row[1:4] == [f"{c.mean_a:.3f}", f"{c.mean_b:.3f}", f"{c.difference:+.3f}"]
    assert row[4] == f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]" and row[5] == c.verdict
    assert "wall time" in printed and (out / "summary.md").read_text().count("|") > 20
    for k in range(2):  # replicate k: fold k + 1 and seed k, the same for both methods
        cfgs = [load_config(out / f"seed{k}" / m / "config.toml") for m in demo.DEMO_METHODS]
        assert {(c.data.fold, c.run.seed, c.data.path) for c in cfgs} == {
            (k + 1, k, str((out / "data").resolve()))
        }
    assert (out / ".smse-demo").is_file()
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_training_restores_the_signal_handlers_and_determinism_flag(run):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not torch.are_deterministic_algorithms_enabled()  # the run asked for it


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "truncated or not a torch checkpoint"),
        (None, "truncated or not a torch checkpoint"),  # the first half of a real one
        ("pickle", "objects other than tensors"),
    ],
)
def test_corrupt_or_hostile_checkpoints_give_one_clear_line(run, tmp_path, content, why, capsys):
    import pickle
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.pt"
    if content is None:
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif content == "pickle":
        best.write_bytes(pickle.dumps({"model": Path("x")}, protocol=2))  # an arbitrary object
    else:
        best.write_bytes(content)
    assert main(["evaluate", "--run", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(best) in err and why in err
    assert "weights_only=False" not in err


def test_moved_data_needs_data_and_a_bad_sheet_fails_before_searching(root, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root, data)
    out = tmp_path / "run"
    train(load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}}), out, data, quiet=True)
    with np.load(out / "embeddings" / "test.npz") as emb:
        query = Path(str(emb["paths"][0]))
    moved = tmp_path / "moved"
    data.rename(moved)
    query = moved / query.relative_to(data)
    assert main(["evaluate", "--run", str(out)]) == 2
    assert "pass --data DIR" in capsys.readouterr().err
    bad = ["search", "--run", str(out), str(query), "--sheet", str(tmp_path / "no" / "s.png")]
    assert main(bad) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", "--run", str(out), str(query)]) == 2  # gallery images moved
    assert "pass --data DIR" in capsys.readouterr().err
    sheet = tmp_path / "s.png"
    args = ["search", "--run", str(out), str(query), "--data", str(moved), "--sheet", str(sheet)]
    assert main(args) == 0 and sheet.is_file()
    assert str(moved) in capsys.readouterr().out
    assert main(["evaluate", "--run", str(out), "--data", str(moved)]) == 0


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
    assert [h["epoch"] for h in _history(out)] == [0]
    monkeypatch.undo()
    train(cfg, out, root, resume=True, quiet=True)
    assert [h["epoch"] for h in _history(out)] == [0, 1, 2]


def test_one_line_per_epoch_without_a_terminal(root, tmp_path, capsys):
    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 2}})
    train(cfg, tmp_path / "run", root)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data: train ") and "validation" in out[0] and "test" in out[0]
    epochs = [x for x in out if x.startswith("epoch ")]
    assert len(epochs) == 2 and all("img/s" in x and "loss" in x for x in epochs)


def test_pretrained_style_inputs_get_the_backbones_mean_and_std(root):
    from smse_metric.recipes.histopathology.build import make_datasets
    from smse_metric.recipes.histopathology.data.dataset import eval_transform, read_image

    cfg = resolve_inputs(load_config("smse-triplet", {**TINY, "model": {"pretrained": False}}))
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    assert cfg.data.interpolation == "bicubic"  # resnet18's timm default
    assert "mean = [0.485, 0.456, 0.406]" in config_to_toml(cfg)
    own = {**TINY, "data": {**TINY["data"], "mean": [0.5] * 3, "std": [0.5] * 3}}
    assert resolve_inputs(load_config("smse-triplet", own)).data.std == [0.5] * 3  # key wins
    ds = make_datasets(cfg, load_splits(cfg, root))
    for name in ("train", "gallery", "val", "test"):
        assert (ds[name].mean, ds[name].std) == (tuple(cfg.data.mean), tuple(cfg.data.std))
    # evaluation: exactly (resize(img) - mean) / std
    img = read_image(ds["test"].paths[0])
    want = eval_transform(tuple(cfg.data.image_size), "bicubic")(img, None)
    want = (want - torch.tensor(cfg.data.mean)[:, None, None]) / torch.tensor(cfg.data.std)[
        :, None, None
    ]
    assert torch.allclose(ds["test"][0][0], want)
    # training images are normalised alike: undoing it lands exactly in [0, 1]
    batch = torch.stack([ds["train"][i][0] for i in range(16)])
    pixels = (
        batch * torch.tensor(cfg.data.std)[:, None, None]
        + torch.tensor(cfg.data.mean)[:, None, None]
    )
    assert batch.max() > 1.5 and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


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


def test_the_demo_data_gives_every_replicate_at_least_40_test_patients(tmp_path):
    from smse_metric.recipes.histopathology import demo
    from smse_metric.recipes.histopathology.splits import split_sizes

    root = make_synthetic_breakhis(tmp_path / "data", demo.DEMO_PATIENTS, seed=0, folds=5,
                                   **demo.DEMO_DATA)  # fmt: skip
    for k in range(demo.DEMO_SEEDS):
        overrides = {key: dict(v) for key, v in demo.DEMO_OVERRIDES.items()}
        overrides["data"].update(path=str(root), fold=k + 1)
        splits = load_splits(load_config("smse-triplet", overrides), root)
        test_patients = len(np.unique(splits.index.group[splits.test]))
        assert test_patients >= 40, (k, split_sizes(splits))
        val = splits.index.label[splits.val]
        for c in (0, 1):  # validation: at least 2 patients of each class
            assert len(np.unique(splits.index.group[splits.val][val == c])) >= 2
