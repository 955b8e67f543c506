"""Similar-case search over a run's gallery."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.training import train


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
