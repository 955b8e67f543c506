"""The paired-replicate demo."""

import json

import numpy as np

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.splits import load_splits


def test_demo_compares_paired_replicates_with_a_confidence_interval(tmp_path, monkeypatch, capsys):
    from smse_metric.recipes.histopathology import demo
    from smse_metric.recipes.histopathology.compare import paired_comparison

    monkeypatch.setattr(demo, "DEMO_PATIENTS", {k: 2 * v for k, v in demo.DEFAULT_PATIENTS.items()})
    tiny = {
        **demo.DEMO_OVERRIDES,
        "optim": {**demo.DEMO_OVERRIDES["optim"], "epochs": 1},
        "sampler": {"groups_per_class": 2},
    }
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", tiny)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    cells = [
        [v.strip() for v in r.strip("|").split("|")]
        for r in printed.splitlines()
        if r.startswith("| ")
    ]
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


def test_the_demo_data_gives_every_replicate_at_least_40_test_patients(tmp_path):
    from smse_metric.recipes.histopathology import demo
    from smse_metric.recipes.histopathology.splits import split_sizes

    root = make_synthetic_breakhis(
        tmp_path / "data", demo.DEMO_PATIENTS, seed=0, folds=5, **demo.DEMO_DATA
    )
    for k in range(demo.DEMO_SEEDS):
        overrides = {key: dict(v) for key, v in demo.DEMO_OVERRIDES.items()}
        overrides["data"].update(path=str(root), fold=k + 1)
        splits = load_splits(load_config("smse-triplet", overrides), root)
        test_patients = len(np.unique(splits.index.group[splits.test]))
        assert test_patients >= 40, (k, split_sizes(splits))
        val = splits.index.label[splits.val]
        for c in (0, 1):  # validation: at least 2 patients of each class
            assert len(np.unique(splits.index.group[splits.val][val == c])) >= 2


def test_the_frozen_demo_compares_heads_on_features_computed_once(tmp_path, monkeypatch, capsys):
    """demo --frozen: both methods on one frozen backbone's cached features (the SMSE
    heads against a linear probe), the backbone run once per image and replicate (its
    seeded random weights differ per replicate), shared by the two methods."""
    from smse_metric.recipes.histopathology import demo
    from smse_metric.recipes.histopathology.data import scan_breakhis
    from smse_metric.recipes.histopathology.models import EmbeddingNet

    monkeypatch.setattr(demo, "DEMO_PATIENTS", {k: 2 * v for k, v in demo.DEFAULT_PATIENTS.items()})
    tiny = {
        **demo.DEMO_OVERRIDES,
        "optim": {**demo.DEMO_OVERRIDES["optim"], "epochs": 2},
        "sampler": {"groups_per_class": 2},
    }
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", tiny)
    seen = []
    real = EmbeddingNet.features
    monkeypatch.setattr(EmbeddingNet, "features", lambda s, x: seen.append(len(x)) or real(s, x))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--device", "cpu", "--seeds", "2", "--frozen", "smse-cnn"]
    assert main(args) == 0
    assert sum(seen) == 2 * len(scan_breakhis(out / "data"))
    assert "linear probe on frozen smse-cnn" in (out / "summary.md").read_text()
    comparison = json.loads((out / "summary.json").read_text())["comparison"]
    verdict = comparison["pooled patient accuracy"]["verdict"]
    assert f"| {verdict}" in capsys.readouterr().out  # printed from paired replicates
    probe = load_config(out / "seed0" / "baseline-ce" / "config.toml")
    smse = load_config(out / "seed1" / "smse-triplet" / "config.toml")
    assert probe.model.freeze_backbone and not probe.model.normalize
    assert smse.model.freeze_backbone and smse.model.normalize
    assert probe.data.cache_dir == smse.data.cache_dir == str(out / "features")
    assert main(["demo", "--out", str(tmp_path / "x"), "--pretrained"]) == 2
    assert "add --frozen" in capsys.readouterr().err
