"""Manifests: every row's file, class, group and scale as written; each kind of bad row is
one error naming the file, the line and the column; rows left out are listed."""

import csv
import importlib.util
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smse_metric.recipes.histopathology.data import make_synthetic_breakhis, scan_breakhis
from smse_metric.recipes.histopathology.data.manifest import read_manifest, write_manifest
from smse_metric.recipes.histopathology.errors import RecipeError


def _tiles(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [  # path, label, group, scale
    ["tiles/a.png", "tumour", "slide1", "20"],
    ["tiles/b.png", "tumour", "slide1", "5"],
    ["tiles/c.png", "normal", "slide2", "10"],
    ["tiles/d.png", "stroma", "slide3", "5"],
]


def test_each_row_reads_back_as_written(tmp_path):
    _tiles(tmp_path / "tiles", ["a.png", "b.png", "c.png", "d.png"])
    m = read_manifest(_csv(tmp_path / "m.csv", ["path", "label", "group", "scale"], ROWS))
    assert m.class_names == ("normal", "stroma", "tumour")
    assert m.group_names == ("slide1", "slide2", "slide3")
    assert m.scale_names == ("5", "10", "20")  # numbers in numeric order
    for i, (path, label, group, scale) in enumerate(ROWS):  # a naive loop over the rows
        assert m.paths[i] == str(tmp_path / path)
        assert m.class_names[m.label[i]] == label
        assert m.group_names[m.group[i]] == group
        assert m.scale_names[m.scale[i]] == scale
    assert m.lines.tolist() == [2, 3, 4, 5] and m.split is None and m.fold is None
    assert m.skipped == []


def test_mapped_columns_absolute_paths_and_text_scales(tmp_path):
    _tiles(tmp_path / "t", ["x.png", "y.png"])
    rows = [
        [str(tmp_path / "t/x.png"), "A", "p1", "low", "train"],
        ["t/y.png", "B", "p2", "high", "test"],
    ]
    header = ["file", "diagnosis", "patient", "objective", "split"]
    m = read_manifest(
        _csv(tmp_path / "m.csv", header, rows),
        columns={"path": "file", "label": "diagnosis", "group": "patient", "scale": "objective"},
    )
    assert m.paths == [str(tmp_path / "t/x.png"), str(tmp_path / "t/y.png")]
    assert m.scale_names == ("high", "low") and m.split.tolist() == ["train", "test"]


BAD = [
    (["path", "label", "group"], [["tiles/a.png", "x", "g"]], r"m\.csv: no column 'scale'"),
    (
        ["path", "label", "group", "scale", "split", "fold"],
        [["tiles/a.png", "x", "g", "5", "train", "1"]],
        r"a split or a fold column, not both",
    ),
    (
        ["path", "label", "group", "scale"],
        [["tiles/a.png", "x", "g", "5"], ["tiles/b.png", "", "g", "5"]],
        r"line 3, column label: empty label",
    ),
    (
        ["path", "label", "group", "scale"],
        [["tiles/a.png", "x", "g", "5"], ["tiles/zz.png", "x", "g", "5"]],
        r"line 3, column path: no file tiles/zz\.png",
    ),
    (
        ["path", "label", "group", "scale"],
        [["tiles/a.png", "x", "g", "5"], ["tiles/../tiles/a.png", "x", "g", "10"]],
        r"line 3, column path: repeats the image of line 2",
    ),
    (
        ["path", "label", "group", "scale", "split"],
        [["tiles/a.png", "x", "g", "5", "train"], ["tiles/b.png", "x", "h", "5", "training"]],
        r"line 3, column split: 'training' is not one of train, val, test",
    ),
    (
        ["path", "label", "group", "scale", "fold"],
        [["tiles/a.png", "x", "g", "5", "0"]],
        r"line 2, column fold: fold must be a positive integer, got '0'",
    ),
    (
        ["path", "label", "group", "scale"],
        [["tiles/a.png", "x", "g", "5"], ["tiles/b.png", "y", "g", "10"]],
        r"line 3, column label: group 'g' has class 'y' here and 'x' on line 2",
    ),
    (["path", "label", "group", "scale"], [], r"no rows to use"),
]


@pytest.mark.parametrize(("header", "rows", "match"), BAD)
def test_a_bad_manifest_is_one_line_naming_the_line_and_column(tmp_path, header, rows, match):
    _tiles(tmp_path / "tiles", ["a.png", "b.png"])
    with pytest.raises(RecipeError, match=match) as e:
        read_manifest(_csv(tmp_path / "m.csv", header, rows))
    assert "\n" not in str(e.value)


def test_a_row_longer_than_the_header_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,group,scale\na.png,x,g,5,extra\n")
    with pytest.raises(RecipeError, match=r"line 2: 5 fields, the header names 4"):
        read_manifest(tmp_path / "m.csv")


def test_missing_files_can_be_skipped_and_are_listed(tmp_path):
    _tiles(tmp_path / "tiles", ["a.png", "c.png"])
    path = _csv(tmp_path / "m.csv", ["path", "label", "group", "scale"], ROWS)
    m = read_manifest(path, missing_files="skip")
    assert [p.rsplit("/", 1)[1] for p in m.paths] == ["a.png", "c.png"]
    assert m.skipped == [(3, "no file tiles/b.png"), (5, "no file tiles/d.png")]
    assert m.class_names == ("normal", "tumour")  # stroma's only row is gone
    with pytest.raises(ValueError, match="missing_files must be"):
        read_manifest(path, missing_files="ignore")
    for name in ("a.png", "c.png"):
        (tmp_path / "tiles" / name).unlink()
    with pytest.raises(RecipeError, match=r"no rows to use \(4 left out\)"):
        read_manifest(path, missing_files="skip")


@pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed here"
)
def test_parquet_without_pyarrow_names_it(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    with pytest.raises(RecipeError, match=r"reading Parquet needs pyarrow"):
        read_manifest(tmp_path / "m.parquet")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_the_order_of_the_rows_changes_nothing_but_the_order(tmp_path_factory, seed):
    """Codes index sorted name tables, so each image keeps its class, group and scale
    whatever the row order."""
    folder = tmp_path_factory.mktemp("m")
    rng = random.Random(seed)
    rows = [
        [f"t/{i}.png", f"c{i % 3}", f"g{i // 2}", str(rng.choice([5, 10, 40]))] for i in range(12)
    ]
    rows = [[p, f"c{int(g[1:]) % 3}", g, s] for p, _, g, s in rows]  # one class per group
    _tiles(folder / "t", [r[0][2:] for r in rows])
    first = read_manifest(_csv(folder / "a.csv", ["path", "label", "group", "scale"], rows))
    rng.shuffle(rows)
    second = read_manifest(_csv(folder / "b.csv", ["path", "label", "group", "scale"], rows))

    def per_image(m):
        return {
            p: (m.class_names[c], m.group_names[g], m.scale_names[s])
            for p, c, g, s in zip(m.paths, m.label, m.group, m.scale, strict=True)
        }

    assert per_image(first) == per_image(second)
    assert (first.class_names, first.group_names, first.scale_names) == (
        second.class_names,
        second.group_names,
        second.scale_names,
    )


@pytest.mark.parametrize("task", ["subtype", "binary"])
def test_a_breakhis_tree_becomes_a_manifest(tmp_path, task):
    root = make_synthetic_breakhis(tmp_path / "d", images_per_magnification=1, image_size=(32, 24))
    index = scan_breakhis(root)
    path = write_manifest(index, root / "manifest.csv", task=task)
    m = read_manifest(path)
    order = np.argsort(index.paths)
    assert sorted(m.paths) == sorted(str(p) for p in np.array(index.paths)[order])
    names = index.subtype_names if task == "subtype" else index.label_names
    codes = index.subtype if task == "subtype" else index.label
    by_path = dict(zip(m.paths, m.label, strict=True))
    for i, p in enumerate(index.paths):
        assert m.class_names[by_path[str(p)]] == names[codes[i]]
    assert m.scale_names == ("40", "100", "200", "400")
    assert len(m.group_names) == len(index.group_names)
    text = path.read_text()
    assert text.splitlines()[0] == "path,label,group,scale"
    assert str(root) not in text  # paths relative to the manifest
    with pytest.raises(RecipeError, match="exists"):
        write_manifest(index, path)
