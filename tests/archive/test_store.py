"""EmbeddingStore: append, duplicates, removal, models never mixed, cut-off writes."""

import numpy as np
import pytest
import torch

from smse_metric.archive import EmbeddingStore


def _store(tmp_path, dtype="float32", dim=3):
    return EmbeddingStore.create(tmp_path / "a", dim=dim, model="net@1", dtype=dtype)


def test_rows_and_metadata_come_back_across_shards_and_reopening(tmp_path):
    s = _store(tmp_path)
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    r1 = s.add(x[:3], cases=["a", "a", "b"], sources=["0", "1", "2"], labels=["x", "x", "y"],
               scales=[40, 100, 40])  # fmt: skip
    r2 = s.add(torch.from_numpy(x[3:]), cases=["c", "c"], sources=["3", "4"])
    assert (r1.added, r1.first, r2.added, r2.first) == (3, 0, 2, 3)
    again = EmbeddingStore(tmp_path / "a")
    assert len(again) == 5 and len(again.shards) == 2
    assert again.case.tolist() == ["a", "a", "b", "c", "c"]
    assert again.label.tolist() == ["x", "x", "y", "", ""]
    assert again.scale.tolist() == ["40", "100", "40", "", ""]
    order = [4, 0, 2, 2, 3]
    assert np.array_equal(again.vectors(order), x[order])
    chunks = list(again.chunks(2))
    assert [c[0] for c in chunks] == [0, 2, 3]
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), x)


def test_float16_halves_the_disk_and_rounds_like_numpy(tmp_path):
    s = _store(tmp_path, "float16")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    s.add(x, cases=list("abcd"), sources=list("abcd"))
    assert np.array_equal(s.vectors(range(4)), x.astype(np.float16).astype(np.float32))
    assert np.load(tmp_path / "a" / "shard-00000.npy").dtype == np.float16


def test_the_same_file_twice_is_added_once_and_counted(tmp_path):
    s = _store(tmp_path)
    x = np.eye(3, dtype=np.float32)
    assert s.add(x, cases="aab", sources=["p", "q", "p"]).duplicates == 1  # within a call
    r = s.add(x, cases="ccc", sources=["q", "r", "s"], keys=["k-q", "k-r", "k-s"])
    assert (r.added, r.duplicates) == (3, 0)  # keys, not sources, decide when given
    r = s.add(x[:2], cases="dd", sources=["z", "zz"], keys=["k-r", "new"])
    assert (r.added, r.duplicates) == (1, 1)
    assert s.key.tolist() == ["p", "q", "k-q", "k-r", "k-s", "new"]
    assert s.add(x[:1], cases="e", sources=["p"]).added == 0  # nothing new: no shard
    assert len(s.shards) == 3


def test_removing_a_case_marks_its_rows_and_allows_adding_it_again(tmp_path):
    s = _store(tmp_path)
    x = np.eye(3, dtype=np.float32)
    s.add(x, cases="aab", sources="pqr")
    assert s.remove_case("a") == 2
    assert s.live.tolist() == [False, False, True]
    assert EmbeddingStore(tmp_path / "a").removed.tolist() == [0, 1]
    with pytest.raises(ValueError, match="case 'a' is not in the archive"):
        s.remove_case("a")
    assert s.add(x[:2], cases="aa", sources="pq").added == 2  # removed rows: no duplicates
    assert s.live.tolist() == [False, False, True, True, True]


def test_vectors_of_another_model_are_refused_in_one_line(tmp_path):
    s = _store(tmp_path)
    with pytest.raises(ValueError, match=r"model 'other@2', but .* holds vectors of 'net@1'"):
        s.add(np.eye(3), cases="abc", sources="abc", model="other@2")
    assert len(s) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vectors": np.ones((2, 4))}, r"vectors must be \[n, 3\]"),
        ({"vectors": np.array([[1, np.nan, 0], [0, 0, 0]])}, "1 rows with NaN"),
        ({"cases": ["a"]}, "cases has 1 values for 2 vectors"),
        ({"cases": ["a", ""]}, "cases has 1 empty ids"),
        ({"labels": ["x"]}, "labels has 1 values"),
    ],
)
def test_bad_rows_are_refused_naming_the_argument(tmp_path, kwargs, message):
    s = _store(tmp_path)
    args = {"vectors": np.ones((2, 3)), "cases": ["a", "b"], "sources": ["p", "q"], **kwargs}
    with pytest.raises(ValueError, match=message):
        s.add(**args)
    assert len(s) == 0


def test_create_and_open_refuse_what_is_not_a_new_archive(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        EmbeddingStore.create(tmp_path / "thesis", dim=3, model="m")
    with pytest.raises(ValueError, match="is not an embedding archive"):
        EmbeddingStore(tmp_path / "thesis")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EmbeddingStore.create(tmp_path / "b", dim=3, model="m", dtype="int8")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        EmbeddingStore.create(tmp_path / "c", dim=0, model="m")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "archive.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"archive\.json is damaged"):
        EmbeddingStore(tmp_path / "d")


def test_an_add_cut_off_before_its_commit_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    s = _store(tmp_path)
    s.add(np.eye(3), cases="abc", sources="abc")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        s.add(np.eye(3) * 2, cases="def", sources="def")
    monkeypatch.undo()
    again = EmbeddingStore(tmp_path / "a")
    assert len(again) == 3 and again.case.tolist() == ["a", "b", "c"]
    # the orphan shard of the cut-off add is replaced by the next one, no temporary left
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    assert again.add(np.eye(3) * 3, cases="def", sources="def").added == 3
    assert np.array_equal(again.vectors([3, 4, 5]), np.eye(3) * 3)
    assert set(before) <= {p.name for p in (tmp_path / "a").iterdir()}


ADDS = 25


def _adder(path: str, who: int) -> None:
    store = EmbeddingStore(path)
    for i in range(ADDS):
        x = np.full((5, 3), who * 100 + i, dtype=np.float32)
        store.add(x, cases=[f"{who}-{i}"] * 5, sources=[f"{who}-{i}-{j}" for j in range(5)])


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
    import multiprocessing as mp

    _store(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_adder, args=(str(tmp_path / "a"), w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    s = EmbeddingStore(tmp_path / "a")
    assert len(s) == 2 * ADDS * 5 and len(s.shards) == 2 * ADDS
    assert sorted(set(s.case.tolist())) == sorted(f"{w}-{i}" for w in (1, 2) for i in range(ADDS))
    for case in set(s.case.tolist()):  # each row's vector is its own batch's
        w, i = map(int, case.split("-"))
        rows = np.flatnonzero(s.case == case)
        assert (s.vectors(rows) == w * 100 + i).all()
