"""BreakHisDataset: decoding, transforms, metadata, bad images, use with the sampler."""

import numpy as np
import pytest
import torch

from smse_metric import MultiScaleBatchSampler
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis, scan_breakhis
from smse_metric.recipes.histopathology.data.dataset import BreakHisDataset


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    make_synthetic_breakhis(
        root,
        images_per_magnification=1,
        image_size=(40, 28),
        seed=1,
        patients_per_subtype={"A": 2, "F": 1, "DC": 2, "LC": 1},
    )
    return scan_breakhis(root)


def test_items_are_images_with_metadata(index):
    ds = BreakHisDataset(index, "eval", size=(32, 32), task="subtype")
    img, label, group, scale = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    assert label == index.subtype[3] and group == index.group[3]
    assert scale == index.magnification[3]
    binary = BreakHisDataset(index, "eval", size=(16, 24))
    assert binary[3][0].shape == (3, 16, 24) and binary[3][1] == index.label[3]


def test_train_transform_is_random_but_reproducible(index):
    ds = BreakHisDataset(index, "train", size=(24, 24), seed=7)
    a, b = ds[0][0], ds[0][0]
    assert torch.equal(a, b)  # same seed, epoch and index
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a)
    assert not torch.equal(ds[1][0], ds[2][0])
    other = BreakHisDataset(index, "train", size=(24, 24), seed=8)
    assert not torch.equal(other[0][0], a)
    assert (a >= 0).all() and (a <= 1).all()


@pytest.mark.parametrize("cached", [False, True])
def test_the_built_in_augmentation_gets_the_pixels_a_callable_floats(index, cached, tmp_path):
    """The built-in 'train' transform is given the uint8 pixels (PNG or cache) and
    equals itself given the same pixels as floats up to their rounding to 1/255 after
    resizing; a callable transform is given float images in [0, 1]."""
    from smse_metric.recipes.histopathology.data.dataset import train_transform

    cache = tmp_path / "c" if cached else None
    ds = BreakHisDataset(index, "train", size=(24, 24), seed=3, cache_dir=cache)
    seen = []
    own = BreakHisDataset(index, lambda img, g: seen.append(img.dtype) or img[:, :8, :8])
    own[0]
    assert seen == [torch.float32]
    for i in range(4):
        g = torch.Generator().manual_seed(ds.seed + i)
        pixels = ds.load_pixels(i)
        assert pixels.dtype == torch.uint8
        want = train_transform((24, 24))(pixels.float() / 255, g)
        got = ds[i][0]
        torch.testing.assert_close(
            got, train_transform((24, 24))(pixels, torch.Generator().manual_seed(ds.seed + i))
        )
        assert (got - want).abs().max() < 0.01 and (got - want).abs().mean() < 2e-3


def test_a_corrupt_png_is_named_or_skipped_and_listed(index, tmp_path):
    bad = index.paths[2]
    with open(bad, "rb") as f:
        original = f.read()
    try:
        with open(bad, "wb") as f:
            f.write(b"not a png at all")
        ds = BreakHisDataset(index, "eval", size=(8, 8))
        with pytest.raises(OSError, match=bad.replace("\\", "\\\\")):
            ds[2]
        skipping = BreakHisDataset(index, "eval", size=(8, 8), skip_bad_images=True)
        assert len(skipping) == len(index) - 1
        assert [p for p, _ in skipping.bad_images] == [bad]
        assert bad not in skipping.paths
        assert "1 unreadable images" in skipping.describe_bad_images()
    finally:
        with open(bad, "wb") as f:
            f.write(original)


def test_dataset_feeds_multiscale_batches(index):
    ds = BreakHisDataset(index, "eval", size=(16, 16))
    sampler = MultiScaleBatchSampler(
        ds.labels, ds.groups, ds.scales, classes_per_batch=2, groups_per_class=2
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    images, labels, _, scales = next(iter(loader))
    assert images.shape == (16, 3, 16, 16)
    assert labels.view(2, 2, 4).unique(dim=None).numel() == 2
    assert (scales.view(2, 2, 4) == torch.tensor([40, 100, 200, 400])).all()


def test_bad_arguments(index):
    with pytest.raises(ValueError, match="task"):
        BreakHisDataset(index, task="grade")
    with pytest.raises(ValueError, match="transform"):
        BreakHisDataset(index, transform="augment")
    assert len(BreakHisDataset(index.subset(np.arange(3)))) == 3
