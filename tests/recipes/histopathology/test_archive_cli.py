"""`smse-metric archive` end to end on a tiny trained run: add, index, search, evaluate,
remove; what it refuses."""

from pathlib import Path

import numpy as np
import pytest
import torch

from smse_metric.archive import EmbeddingStore
from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.data import scan_breakhis


@pytest.fixture(scope="module")
def archive(run, root, tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "archive"
    assert main(["archive", "add", str(path), "--run", str(run), "--data", str(root)]) == 0
    return path


def test_add_embeds_every_image_once_with_the_runs_model(archive, run, root, capsys):
    store = EmbeddingStore(archive)
    index = scan_breakhis(root)
    assert len(store) == len(index.paths)
    # the run's own embeddings of its test images (float32) are the archive's (float16)
    with np.load(run / "embeddings" / "test.npz") as t:
        paths, emb = t["paths"].tolist(), t["embeddings"]
    where = {p: i for i, p in enumerate(store.source.tolist())}
    got = store.vectors([where[p] for p in paths])
    np.testing.assert_allclose(got, emb, atol=2e-3, rtol=2e-3)
    row = where[paths[0]]
    assert store.scale[row] in {"40", "100", "200", "400"}
    assert store.label[row] in index.subtype_names and store.case[row] in index.group_names
    # again, under another name too: nothing added
    capsys.readouterr()
    assert main(["archive", "add", str(archive), "--run", str(run), "--data", str(root)]) == 0
    assert f"added nothing: {len(store)} images already in" in capsys.readouterr().out
    assert len(EmbeddingStore(archive)) == len(store)


def test_index_search_evaluate_and_remove(archive, run, capsys, tmp_path):
    a = str(archive)
    assert main(["archive", "index", a, "--kind", "hnsw", "--recall", "0.9", "--probes", "40"]) == 0
    assert "hnsw index of" in capsys.readouterr().out
    assert (archive / "index-hnsw.faiss").is_file()
    store = EmbeddingStore(archive)
    query, own = store.source[0], store.case[0]
    sheet = tmp_path / "sheet.png"
    args = ["archive", "search", a, query, "--run", str(run), "--cases", "3"]
    assert main([*args, "--exclude-case", own, "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[1] for line in out.splitlines()[1:4]]
    assert own not in listed and len(listed) == 3 and "suggested label:" in out
    assert sheet.is_file()
    assert main([*args, "--scales", "same"]) == 0  # BreakHis names carry the scale
    assert (archive / f"search-{Path(query).stem}.png").is_file()  # the default sheet
    capsys.readouterr()
    assert main(["archive", "evaluate", a, "--index", "hnsw", "--per-case", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("exact") and out.splitlines()[2].startswith("hnsw")
    assert "approximation costs" in out
    assert main(["archive", "remove", a, "--case", listed[0]]) == 0
    assert main([*args, "--exclude-case", own]) == 0
    out = capsys.readouterr().out
    assert listed[0] not in [line.split()[1] for line in out.splitlines()[2:5]]
    assert main(["archive", "remove", a, "--case", listed[0]]) == 2  # already removed


def test_what_archive_refuses_is_one_line(run, root, tmp_path, capsys):
    other = tmp_path / "other"
    EmbeddingStore.create(other, dim=8, model="resnet50@0000")
    cmd = ["archive", "add", str(other), "--run", str(run), "--data", str(root)]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "did not embed the archive" in err and "never mixed" in err
    assert len(err.strip().splitlines()) == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    assert main(["archive", "add", str(mine), "--run", str(run), "--data", str(root)]) == 2
    assert "is not an archive" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "mine" and len(list(mine.iterdir())) == 1
    assert main(["archive", "search", str(other), "x.png", "--run", str(run)]) == 2
    assert "did not embed the archive" in capsys.readouterr().err
    assert main(["archive", "index", str(tmp_path / "none")]) == 2
    assert "not an embedding archive" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without GPU")
def test_exact_searches_on_a_missing_gpu_are_one_line(archive, capsys):
    for verb in (["evaluate", str(archive)], ["index", str(archive), "--kind", "exact"]):
        assert main(["archive", *verb, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "no CUDA device is available here" in err and len(err.splitlines()) == 1
