"""The decoded-image cache: built once, reused, rebuilt when a file changes; datasets
that read it, and device augmentation fed from it."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from smse_metric.recipes.histopathology.data.augment import resize
from smse_metric.recipes.histopathology.data.cache import DecodedCache, cache_size
from smse_metric.recipes.histopathology.data.dataset import (
    BreakHisDataset,
    collate_records,
    split_records,
)
from smse_metric.recipes.histopathology.data.images import read_image
from smse_metric.recipes.histopathology.data.rowfile import RowFile
from smse_metric.recipes.histopathology.errors import RecipeError


def _pngs(tmp_path, n=3):
    paths = []
    for i in range(n):
        rgb = np.random.default_rng(i).integers(0, 256, (14, 18, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    return [str(p) for p in paths]


def test_built_once_then_read_back_as_the_resized_images(tmp_path):
    paths = _pngs(tmp_path)
    cache = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    again = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    assert cache.built and not again.built and again.path == cache.path
    for i, p in enumerate(paths):
        want = resize(read_image(p), (8, 10)).mul(255).round().to(torch.uint8)
        assert torch.equal(again[i], want)
    left = sorted(f.name for f in (tmp_path / "c").iterdir())  # no partial file left
    assert left == sorted([cache.path.name, cache.digest_path.name])


def test_a_changed_file_gives_a_new_cache(tmp_path):
    paths = _pngs(tmp_path)
    first = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    Image.new("RGB", (18, 14), (255, 0, 0)).save(paths[1])
    stamp = os.stat(paths[1]).st_mtime_ns + 10**9  # a rewrite within the same tick
    os.utime(paths[1], ns=(stamp, stamp))
    second = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    assert second.built and second.path != first.path
    assert second[1][:, 0, 0].tolist() == [255, 0, 0]
    assert DecodedCache(paths, (8, 12), tmp_path / "c", read=read_image).built  # other size


def test_a_file_that_is_not_a_cache_is_refused(tmp_path):
    paths = _pngs(tmp_path)
    cache = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    cache.path.write_bytes(b"not images")
    with pytest.raises(RecipeError, match="not a cache"):
        DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)


def test_a_cache_travels_to_worker_processes_without_its_mapping(tmp_path):
    cache = DecodedCache(_pngs(tmp_path), (8, 10), tmp_path / "c", read=read_image)
    first = cache[0]
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.rows._rows is None and torch.equal(clone[0], first)


def test_an_empty_split_gives_an_empty_cache(tmp_path):
    cache = DecodedCache([], (8, 10), tmp_path / "c", read=read_image)
    again = DecodedCache([], (8, 10), tmp_path / "c", read=read_image)
    assert len(cache) == len(again) == 0 and cache.built and not again.built


def test_cache_size_covers_the_smallest_crop():
    assert cache_size((224, 224), (0.6, 1.0)) == (290, 290)
    assert cache_size((32, 48), (1.0, 1.0)) == (32, 48)
    with pytest.raises(RecipeError, match="crop_scale"):
        cache_size((32, 32), (0.0, 1.0))


def test_gather_reads_rows_in_one_batch(tmp_path):
    cache = DecodedCache(_pngs(tmp_path, 4), (8, 10), tmp_path / "c", read=read_image)
    rows = torch.tensor([3, 0, 3, 1])
    got = cache.gather(rows)
    assert got.shape == (4, 3, 8, 10) and got.dtype == torch.uint8
    assert all(torch.equal(got[j], cache[int(r)]) for j, r in enumerate(rows))
    assert cache.gather([]).shape == (0, 3, 8, 10)
    for bad, exc in (([4], IndexError), ([-1], IndexError), ([[0]], ValueError)):
        with pytest.raises(exc, match="rows"):
            cache.gather(bad)


def test_datasets_read_the_cache_and_augment_on_the_device(synth_index, tmp_path):
    """Evaluation images from the cache stay close to those decoded from PNG; with
    augment_on="device" the loader gets rows and records (no pixels), and the batch
    gathered from the cache and augmented on the device matches the workers'
    augmentation of the same cached images."""
    kw = dict(size=(16, 16), seed=3, cache_dir=tmp_path / "c")
    png = BreakHisDataset(synth_index, "eval", size=(16, 16))
    cached = BreakHisDataset(synth_index, "eval", **kw)
    assert cached.cache is not None and cached.cache.shape[2:] == cache_size((16, 16), (0.6, 1))
    diff = torch.stack([(png[i][0] - cached[i][0]).abs().mean() for i in range(8)])
    assert diff.max() < 0.03
    worker = BreakHisDataset(synth_index, "train", **kw)
    device = BreakHisDataset(synth_index, "train", augment_on="device", **kw)
    for ds in (worker, device):
        ds.set_epoch(2)
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    batch = split_records(collate_records([device[i] for i in order]))
    assert batch[0].tolist() == order and batch[1].shape == (8, 16)
    assert torch.equal(batch[1], torch.stack([device[i][1] for i in order]))
    assert batch[3].tolist() == [worker[i][2] for i in order]
    assert batch[4].tolist() == [worker[i][3] for i in order]
    got = device.device_batch(batch[0], batch[1], "cpu")
    want = torch.stack([worker[i][0] for i in order])
    assert got.shape == want.shape and (got - want).abs().mean() < 0.03
    # the same images as augmenting each cached image on its own
    one = torch.cat(
        [
            device.device_transform(device.cache[i][None], batch[1][j : j + 1])
            for j, i in enumerate(order)
        ]
    )
    assert torch.equal(got, one)
    assert [int(v) for v in batch[2]] == [worker[i][1] for i in order]
    with pytest.raises(RecipeError, match="augment_on"):
        BreakHisDataset(synth_index, "eval", augment_on="device", size=(16, 16))
    with pytest.raises(RecipeError, match="cache_dir"):
        BreakHisDataset(synth_index, "train", augment_on="device", size=(16, 16))


def _bmp(path, colour):
    Image.new("RGB", (18, 14), colour).save(path, format="BMP")  # a fixed size: no compression
    return str(path)


def test_a_same_size_same_mtime_rewrite_is_never_read_stale(tmp_path):
    """The key was (path, size, mtime): a file rewritten with other pixels, the same
    length and its old mtime was read from the old cache."""
    paths = [_bmp(tmp_path / "a.bmp", (0, 0, 255)), _bmp(tmp_path / "b.bmp", (0, 255, 0))]
    first = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    st = os.stat(paths[1])
    size = st.st_size
    _bmp(tmp_path / "b.bmp", (255, 0, 0))
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(paths[1]).st_size == size and os.stat(paths[1]).st_mtime_ns == st.st_mtime_ns
    second = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    assert second.built and second.path != first.path
    assert second[1][:, 0, 0].tolist() == [255, 0, 0]


def test_a_damaged_cache_file_is_refused_in_one_line(tmp_path):
    paths = _pngs(tmp_path)
    cache = DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)
    data = bytearray(cache.path.read_bytes())
    data[100] ^= 0xFF  # the same size, one byte flipped
    cache.path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match=r"is damaged .*remove it to rebuild it"):
        DecodedCache(paths, (8, 10), tmp_path / "c", read=read_image)


def test_a_cache_truncated_while_in_use_raises_naming_it_not_a_bus_error(tmp_path):
    paths = _pngs(tmp_path)
    cache = DecodedCache(paths, (64, 64), tmp_path / "c", read=read_image)
    cache[0]  # mapped; rows of 3 pages: a read past the end of the file was a bus error
    os.truncate(cache.path, 3 * 64 * 64 + 7)  # another process cut it mid-run
    with pytest.raises(OSError, match=r"shorter than its 3 images: it was truncated"):
        cache.gather([0, 1])
    with pytest.raises(OSError, match=str(cache.path)):
        cache[2]


@pytest.mark.parametrize("fault", ["a file", "read-only"])
def test_an_unusable_cache_dir_is_refused_in_one_line(tmp_path, fault, monkeypatch):
    paths = _pngs(tmp_path)
    where = tmp_path / "c"
    if fault == "a file":
        where.write_text("not a directory")
    else:  # root ignores permissions: the write fails as it would for a user

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(RowFile, "write", denied)
    with pytest.raises(RecipeError, match=rf"data.cache_dir {where} cannot hold the decoded"):
        DecodedCache(paths, (8, 10), where, read=read_image)
