"""The recipe on a dataset that is not BreakHis: tiles of three classes at three scales with
slides as groups, listed in a spreadsheet whose columns have their own names. The CLI
trains, evaluates and searches from it with BreakHis's guarantees (patient-disjoint
splits, validation patients of every class, rows left out counted and listed)."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import config_to_toml, load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.search import search_run
from smse_metric.recipes.histopathology.splits import load_splits, scan_data

CLASSES = ("normal", "stroma", "tumour")
SCALES = (5, 10, 20)
HEADER = ["file", "diagnosis", "slide_id", "objective"]
COLUMNS = {"path": "file", "label": "diagnosis", "group": "slide_id", "scale": "objective"}


def make_tiles(root, slides_per_class=7, per_scale=2, extra=None, seed=0):
    """Tinted noise tiles (the class sets the tint) and ``root/tiles.csv`` listing them
    under HEADER, one row per tile, plus ``extra`` rows as given."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(CLASSES):
        for s in range(slides_per_class):
            slide = f"{name[:2].upper()}-{s:02d}"
            folder = root / "tiles" / slide
            folder.mkdir(parents=True, exist_ok=True)
            for scale in SCALES:
                for i in range(per_scale):
                    pixels = rng.integers(0, 120, (32, 32, 3))
                    pixels[..., c] += 100 + scale * 2
                    file = folder / f"x{scale}_{i}.png"
                    Image.fromarray(pixels.astype(np.uint8)).save(file)
                    rows.append([file.relative_to(root).as_posix(), name, slide, str(scale)])
    rows += extra or []
    manifest = root / "tiles.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return manifest


def tiles_config(manifest, **data):
    base = {**TINY["data"], "synthetic": False, "path": str(manifest), "columns": COLUMNS}
    return load_config("smse-triplet", {**TINY, "data": {**base, **data}, "optim": {"epochs": 1}})


def test_the_cli_trains_evaluates_and_searches_a_manifest(tmp_path, capsys):
    missing = ["tiles/gone.png", "normal", "NO-00", "5"]
    manifest = make_tiles(tmp_path / "lab", extra=[missing])
    cache = str(tmp_path / "cache")  # the decoded cache, built from the manifest's files
    cfg = tiles_config(manifest, task="subtype", missing_files="skip", cache_dir=cache)
    config = tmp_path / "tiles.toml"
    config.write_text(config_to_toml(cfg))
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(manifest), "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    knn = metrics["test"]["knn"]
    assert metrics["data"]["class_names"] == list(CLASSES)
    assert len(knn["pooled"]["confusion"]) == 3
    assert set(knn["per_scale"]) == {"5", "10", "20"}
    assert len(knn["cross_magnification"]) == 3
    n_rows = 3 * 7 * 3 * 2
    assert metrics["data"]["images"] == n_rows and metrics["data"]["rows_skipped"] == 1
    assert metrics["data"]["skipped_rows"] == [f"line {n_rows + 2}: no file tiles/gone.png"]
    assert sum(metrics["splits"].values()) == n_rows
    assert any((tmp_path / "cache").iterdir())

    saved = load_config(out / "config.toml")  # the manifest's classes and columns, kept
    assert saved.data.classes == list(CLASSES) and saved.data.columns == COLUMNS
    splits = load_splits(saved, manifest)
    parts = [set(splits.index.group[m].tolist()) for m in (splits.train, splits.val, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for m in (splits.train, splits.val, splits.test):  # every class in every part
        assert set(splits.index.subtype[m].tolist()) == {0, 1, 2}
    with (
        np.load(out / "embeddings" / "test.npz") as test,
        np.load(out / "embeddings" / "gallery.npz") as gallery,
    ):
        assert not set(test["groups"].tolist()) & set(gallery["groups"].tolist())
        assert test["subtype_names"].tolist() == list(CLASSES)

    report = (out / "report.md").read_text()
    assert "- classes: normal, stroma, tumour" in report
    assert "- manifest rows left out: 1" in report and "no file tiles/gone.png" in report

    assert main(["evaluate", "--run", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["test"] == metrics["test"]

    query = tmp_path / "lab" / "tiles" / "TU-00" / "x10_0.png"
    found = search_run(out, query, k=3)
    assert len(found) == 3 and all(n.subtype in CLASSES for n in found)
    assert {n.magnification for n in found} <= set(SCALES)

    moved = tmp_path / "moved"  # the lab's folder, copied: found again under its new root
    shutil.copytree(tmp_path / "lab", moved)
    assert main(["evaluate", "--run", str(out), "--data", str(moved / "tiles.csv")]) == 0
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    again = search_run(out, query, k=3, data=moved / "tiles.csv")
    assert [n.path for n in again] == [n.path.replace("/lab/", "/moved/") for n in found]
    capsys.readouterr()
    assert main(["search", "--run", str(out), str(query), "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert any(name in printed for name in CLASSES)


def test_binary_task_groups_classes_by_a_config_key(tmp_path):
    manifest = make_tiles(tmp_path, slides_per_class=3, per_scale=1)
    with pytest.raises(RecipeError, match=r"data\.positive_classes: the binary task"):
        scan_data(tiles_config(manifest).data, manifest)
    index = scan_data(tiles_config(manifest, positive_classes=["tumour"]).data, manifest)
    for c, name in enumerate(CLASSES):  # a naive loop over the classes
        assert (index.label[index.subtype == c] == (name == "tumour")).all()
    assert index.label_names == ("negative", "positive")
    with pytest.raises(RecipeError, match=r"data\.positive_classes: 'cancer' is not a class"):
        scan_data(tiles_config(manifest, positive_classes=["cancer"]).data, manifest)
    with pytest.raises(RecipeError, match=r"data\.magnifications: the data has no scale 40"):
        scan_data(tiles_config(manifest, task="subtype", magnifications=[5, 40]).data, manifest)
    with pytest.raises(RecipeError, match=r"data's classes .* are not the run's data\.classes"):
        scan_data(tiles_config(manifest, task="subtype", classes=["a", "b"]).data, manifest)


def _with_column(manifest, name, value_of):
    """``manifest`` rewritten with one more column, its value a function of the row."""
    with open(manifest, newline="") as f:
        rows = list(csv.reader(f))
    rows[0].append(name)
    for row in rows[1:]:
        row.append(value_of(row))
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return manifest


def test_split_and_fold_columns_decide_the_parts(tmp_path):
    manifest = make_tiles(tmp_path / "a", slides_per_class=4, per_scale=1)
    part = {"00": "train", "01": "train", "02": "val", "03": "test"}
    _with_column(manifest, "split", lambda row: part[row[2][-2:]])
    s = load_splits(tiles_config(manifest, task="subtype"), manifest)
    for mask, want in ((s.train, "train"), (s.val, "val"), (s.test, "test")):
        names = {s.index.group_names[g][-2:] for g in s.index.group[mask]}
        assert {part[n] for n in names} == {want}

    manifest = make_tiles(tmp_path / "b", slides_per_class=5, per_scale=1)
    _with_column(manifest, "fold", lambda row: str(int(row[2][-2:]) % 3 + 1))
    s = load_splits(tiles_config(manifest, task="subtype", fold=2), manifest)
    assert {int(s.index.group_names[g][-2:]) % 3 + 1 for g in s.index.group[s.test]} == {2}
    assert (s.index.fold[s.train | s.val] != 2).all() and s.val.any()
    with pytest.raises(RecipeError, match=r"data\.fold = 4, but the manifest's fold column"):
        load_splits(tiles_config(manifest, task="subtype", fold=4), manifest)

    manifest = make_tiles(tmp_path / "c", slides_per_class=3, per_scale=1)
    _with_column(manifest, "split", lambda row: "test" if row[0].endswith("x20_0.png") else "train")
    with pytest.raises(RecipeError, match=r"split column: group '.*' has rows in 'train' and"):
        load_splits(tiles_config(manifest, task="subtype"), manifest)


def test_a_run_inside_an_image_folder_of_the_manifest_is_refused(tmp_path, capsys):
    manifest = make_tiles(tmp_path, per_scale=1)
    cfg = tiles_config(manifest, task="subtype")
    config = tmp_path / "tiles.toml"
    config.write_text(config_to_toml(cfg))
    inside = tmp_path / "tiles" / "NO-00" / "run"
    argv = ["train", "--config", str(config), "--data", str(manifest), "--out", str(inside)]
    assert main(argv) == 2
    assert "lies inside the data" in capsys.readouterr().err
    assert not inside.exists()
