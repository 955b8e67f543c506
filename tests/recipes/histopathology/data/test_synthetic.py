"""The synthetic BreakHis: deterministic, BreakHis-shaped, learnable but not trivial."""

import hashlib

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from smse_metric.recipes.histopathology.cli import main as cli_main
from smse_metric.recipes.histopathology.data import (
    load_folds,
    make_synthetic_breakhis,
    scan_breakhis,
)


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def features(path):
    """Simple colour and texture statistics of one image."""
    x = np.asarray(Image.open(path), dtype=np.float64) / 255
    gray = x.mean(2)
    dark = gray < 0.45
    gy, gx = np.abs(np.diff(gray, axis=0)).mean(), np.abs(np.diff(gray, axis=1)).mean()
    return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [dark.mean(), gy, gx]])


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    make_synthetic_breakhis(root, images_per_magnification=4, seed=0)
    return root


def test_generator_is_deterministic_for_a_seed(tmp_path):
    kw = dict(
        images_per_magnification=1, image_size=(24, 16), patients_per_subtype={"A": 1, "DC": 2}
    )
    a = make_synthetic_breakhis(tmp_path / "a", seed=5, **kw)
    b = make_synthetic_breakhis(tmp_path / "b", seed=5, **kw)
    c = make_synthetic_breakhis(tmp_path / "c", seed=6, **kw)
    assert digest(a) == digest(b) != digest(c)


def test_imbalance_is_shaped_like_breakhis(tmp_path):
    root = make_synthetic_breakhis(tmp_path, images_per_magnification=1, image_size=(24, 16))
    idx = scan_breakhis(root)
    per = idx.report["per_subtype"]
    assert per["DC"] == max(per.values())  # ductal carcinoma dominates, as in BreakHis
    assert 0.55 < idx.label.mean() < 0.8  # malignant majority (68.6% in BreakHis)
    img = Image.open(idx.paths[0])
    assert img.size == (24, 16) and img.mode == "RGB"


def test_cli_synth_writes_the_tree(tmp_path, capsys):
    assert (
        cli_main(
            [
                "synth",
                str(tmp_path / "s"),
                "--seed",
                "2",
                "--images-per-magnification",
                "1",
                "--width",
                "24",
                "--height",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "images of 24 patients" in out and (tmp_path / "s" / "Folds.csv").is_file()
    assert cli_main(["synth", str(tmp_path / "x"), "--width", "4"]) == 2
    assert "image_size" in capsys.readouterr().err


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown subtypes"):
        make_synthetic_breakhis(tmp_path, patients_per_subtype={"XX": 1})
    with pytest.raises(ValueError, match="images_per_magnification"):
        make_synthetic_breakhis(tmp_path, images_per_magnification=0)


def test_a_linear_probe_beats_chance_but_is_far_from_perfect(demo_set):
    idx = scan_breakhis(demo_set)
    x = np.stack([features(p) for p in idx.paths])
    y = idx.label
    accs = []
    for fold in range(1, 6):
        masks = idx.masks(load_folds(demo_set / "Folds.csv", fold))
        scaler = StandardScaler().fit(x[masks["train"]])
        clf = LogisticRegression(max_iter=2000).fit(
            scaler.transform(x[masks["train"]]), y[masks["train"]]
        )
        accs.append(clf.score(scaler.transform(x[masks["test"]]), y[masks["test"]]))
    chance = max(y.mean(), 1 - y.mean())
    # measured at seed 0: 0.666 against a majority rate of 0.609
    assert np.mean(accs) > chance + 0.03, (accs, chance)
    assert np.mean(accs) < 0.9, accs
