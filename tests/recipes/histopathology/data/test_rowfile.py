"""The row file under both caches: written atomically with its digest, refused when
damaged or short, read by row, re-mapped per process."""

import pickle

import numpy as np
import pytest
import torch

from smse_metric.recipes.histopathology.data.rowfile import RowFile, file_digest
from smse_metric.recipes.histopathology.errors import RecipeError


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_rows_read_back_as_written(tmp_path, dtype):
    rng = np.random.default_rng(0)
    rows = (rng.random((5, 2, 3)) * 100).astype(dtype)
    f = RowFile(tmp_path / "r.bin", rows.shape, dtype)
    f.write(iter(rows))
    f.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin", "r.bin.b2"]  # no partial
    for i in range(5):  # a naive loop: each row as written
        assert np.array_equal(f.mapped()[i], rows[i])
    got = f.gather([4, 0, 4])
    assert got.dtype == torch.from_numpy(rows).dtype
    assert np.array_equal(got.numpy(), rows[[4, 0, 4]])
    assert f.gather([]).shape == (0, 2, 3)
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 5\), got 0\.\.5"):
        f.gather([0, 5])
    clone = pickle.loads(pickle.dumps(f))  # as a loader worker receives it
    assert clone._rows is None and np.array_equal(clone.gather([1]).numpy(), rows[[1]])


def test_a_damaged_or_short_file_is_refused(tmp_path):
    f = RowFile(tmp_path / "r.bin", (4, 8), np.uint8, "images")
    f.write(np.full(8, i, dtype=np.uint8) for i in range(4))
    data = bytearray(f.path.read_bytes())
    data[3] ^= 1
    f.path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="is damaged"):
        f.check()
    f.path.write_bytes(bytes(data[:-8]))
    with pytest.raises(RecipeError, match=r"is not a cache of \(4, 8\) images \(24 bytes\)"):
        f.check()


def test_a_file_truncated_in_use_is_an_error_naming_it(tmp_path):
    f = RowFile(tmp_path / "r.bin", (4, 8), np.uint8, "images")
    f.write(np.zeros((4, 8), dtype=np.uint8))
    f.gather([0])  # mapped
    with open(f.path, "r+b") as out:
        out.truncate(8)
    with pytest.raises(OSError, match=r"shorter than its 4 images"):
        f.gather([0])


def test_a_failed_write_leaves_nothing(tmp_path):
    f = RowFile(tmp_path / "r.bin", (3, 2), np.uint8)

    def rows():
        yield np.zeros(2, dtype=np.uint8)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        f.write(rows())
    assert list(tmp_path.iterdir()) == [] and not f.exists()


def test_the_digest_follows_the_bytes(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"abc")
    first = file_digest(p)
    p.write_bytes(b"abd")  # same size: a new digest all the same
    assert file_digest(p) != first
