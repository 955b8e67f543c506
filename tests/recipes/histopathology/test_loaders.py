"""A run's datasets and loaders: which splits are made, from which rows, and how the
loaders batch them."""

import numpy as np
import pytest
import torch
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.loaders import (
    SPLIT_NAMES,
    Datasets,
    eval_loader,
    make_datasets,
    train_loader,
)
from smse_metric.recipes.histopathology.splits import load_splits
from smse_metric.samplers import MultiScaleBatchSampler, ShuffledBatchSampler


@pytest.fixture(scope="module")
def made(root):
    cfg = load_config("smse-triplet", TINY)
    splits = load_splits(cfg, root)
    return cfg, splits, make_datasets(cfg, splits)


def test_each_split_is_made_from_its_rows_with_its_transform(made):
    _, splits, ds = made
    assert list(ds.made()) == list(SPLIT_NAMES)
    for name, rows in (("train", splits.train), ("gallery", splits.train), ("val", splits.val)):
        assert list(getattr(ds, name).paths) == list(splits.index.subset(rows).paths), name
    assert list(ds.test.paths) == list(splits.index.subset(splits.test).paths)
    # the same image: augmented (and so different per epoch) in train, fixed in gallery
    first = [ds.train[0][0], ds.gallery[0][0]]
    ds.train.set_epoch(1)
    ds.gallery.set_epoch(1)
    assert not torch.equal(ds.train[0][0], first[0])
    assert torch.equal(ds.gallery[0][0], first[1])
    ds.train.set_epoch(0)
    ds.gallery.set_epoch(0)


def test_a_subset_of_splits_and_a_bad_name(root):
    cfg = load_config("smse-triplet", TINY)
    splits = load_splits(cfg, root)
    only = make_datasets(cfg, splits, names=("gallery", "test"), collective=False)
    assert list(only.made()) == ["gallery", "test"] and only.train is None
    with pytest.raises(ValueError, match="names: 'training' is not one of"):
        make_datasets(cfg, splits, names=("training",))


def test_bad_images_are_listed_once_across_the_datasets():
    class Fake:
        def __init__(self, bad):
            self.bad_images = bad

    ds = Datasets(train=Fake([["a.png", "truncated"]]), gallery=Fake([["a.png", "truncated"]]))
    ds.test = Fake([["b.png", "not an image"]])
    assert ds.bad_images() == [["a.png", "truncated"], ["b.png", "not an image"]]


def test_the_eval_loader_keeps_the_order_in_batches_of_64(made):
    _, _, ds = made
    loader = eval_loader(ds.gallery)
    labels = np.concatenate([batch[1].numpy() for batch in loader])
    np.testing.assert_array_equal(labels, ds.gallery.labels)
    assert loader.batch_size == 64 and loader.num_workers == 0


def test_the_train_loader_follows_the_sampler_kind(root):
    multi = load_config("smse-triplet", TINY)
    ds = make_datasets(multi, load_splits(multi, root), names=("train",))
    assert isinstance(train_loader(multi, ds.train).batch_sampler, MultiScaleBatchSampler)
    freq = load_config("smse-triplet", {**TINY, "sampler": {"kind": "frequency", "batch_size": 8}})
    sampler = train_loader(freq, ds.train).batch_sampler
    assert isinstance(sampler, ShuffledBatchSampler)
    assert {len(b) for b in sampler} <= {8} and len(sampler) == len(ds.train) // 8


def test_a_sampler_that_does_not_fit_the_training_split_names_the_section(root):
    cfg = load_config("smse-triplet", {**TINY, "sampler": {"classes_per_batch": 5}})
    ds = make_datasets(cfg, load_splits(cfg, root), names=("train",))
    with pytest.raises(RecipeError, match=r"\[sampler\] on the training split"):
        train_loader(cfg, ds.train)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 64, 150, 1000])
def test_eval_rows_cover_every_image_once_in_single_process_batches(monkeypatch, world, n):
    from smse_metric.recipes.histopathology import loaders

    parts = []
    for rank in range(world):
        monkeypatch.setattr(loaders, "get_world_size", lambda w=world: w)
        monkeypatch.setattr(loaders, "get_rank", lambda r=rank: r)
        parts.append(loaders.eval_rows(n))
    covered = [i for p in parts for i in range(p.start, p.stop)]
    assert covered == list(range(n))  # in order, none twice, none dropped
    for p in parts:  # every shard starts where a single process's batch starts
        assert p.start % loaders.EVAL_BATCH == 0 or p.start == n
