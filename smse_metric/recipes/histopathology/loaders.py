"""A run's datasets and their loaders: the four splits' datasets, made once and
verified once (`make_datasets`), and the training and evaluation loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from smse_metric.distributed import get_rank, get_world_size
from smse_metric.samplers import MultiScaleBatchSampler, ShuffledBatchSampler

from .config import Config
from .data.dataset import BreakHisDataset, collate_records
from .data.features import (
    FeatureCache,
    FeatureDataset,
    default_cache_dir,
    feature_key,
    module_digest,
)
from .errors import RecipeError
from .models import EmbeddingNet
from .splits import Splits

__all__ = [
    "SPLIT_NAMES",
    "Datasets",
    "eval_loader",
    "make_datasets",
    "train_loader",
    "with_features",
]


SPLIT_NAMES = ("train", "gallery", "val", "test")


@dataclasses.dataclass
class Datasets:
    """A run's datasets (None where not made).

    Attributes:
        train: the training images, augmented.
        gallery: the training images with the evaluation transform (the kNN gallery).
        val: the validation patients' images.
        test: the test patients' images.

    Examples:
        >>> Datasets().made()
        {}
    """

    train: BreakHisDataset | None = None
    gallery: BreakHisDataset | None = None
    val: BreakHisDataset | None = None
    test: BreakHisDataset | None = None

    def made(self) -> dict[str, BreakHisDataset]:
        """The datasets made, by split name."""
        return {k: v for k in SPLIT_NAMES if (v := getattr(self, k)) is not None}

    def bad_images(self) -> list[list[str]]:
        """``[path, reason]`` of every image left out as unreadable, once each."""
        seen: dict[str, str] = {}
        for d in self.made().values():
            for path, why in d.bad_images:
                seen.setdefault(path, why)
        return [[p, why] for p, why in seen.items()]


def make_datasets(
    cfg: Config,
    splits: Splits,
    names: tuple[str, ...] = SPLIT_NAMES,
    collective: bool = True,
    model: EmbeddingNet | None = None,
) -> Datasets:
    """The run's datasets named in ``names``, normalised as ``cfg.data`` says; with
    ``model.freeze_backbone`` and the ``model`` given, of the backbone's cached features
    (`with_features`).

    Args:
        cfg: the run's `Config` (``data.mean`` etc. resolved, see `resolve_inputs`).
        splits: the run's `Splits`.
        names: which of ``train``, ``gallery``, ``val``, ``test`` to make.
        collective: every rank of a process group calls this together (rank 0 then
            builds a decoded cache first, the others wait for it); False for a call of
            one rank alone.
        model: the run's network, on its device (its frozen backbone fills the feature
            cache), or None for image datasets.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology import load_config
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> from smse_metric.recipes.histopathology.splits import load_splits
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> cfg = load_config(overrides={"data": {"path": str(root), "image_size": [16, 16],
        ...                                       "num_workers": 0}})
        >>> ds = make_datasets(cfg, load_splits(cfg, root))
        >>> sorted(ds.made()), len(ds.gallery) == len(ds.train)
        (['gallery', 'test', 'train', 'val'], True)
    """
    for name in names:
        if name not in SPLIT_NAMES:
            raise ValueError(f"names: {name!r} is not one of {SPLIT_NAMES}")
    d = cfg.data
    checked: dict[str, str | None] = {}  # each image verified once for every dataset
    rows = {"train": splits.train, "gallery": splits.train, "val": splits.val, "test": splits.test}
    rows["every"] = np.ones(len(splits.index), dtype=bool)  # a frozen backbone's cache

    frozen = cfg.model.freeze_backbone and model is not None

    def make(name: str) -> BreakHisDataset:
        # a frozen backbone's features are of the images as they are, not augmented
        transform = "train" if name == "train" and not frozen else "eval"
        return BreakHisDataset(
            splits.index.subset(rows[name]),
            transform,
            size=tuple(d.image_size),
            task=d.task,
            seed=cfg.run.seed,
            skip_bad_images=d.skip_bad_images,
            mean=d.mean,
            std=d.std,
            interpolation=d.interpolation or "bilinear",
            cache_dir=None if frozen else d.cache_dir,
            # device augmentation is the training transform's; evaluation images are finished
            augment_on=d.augment_on if transform == "train" else "worker",
            max_image_pixels=d.max_image_pixels,
            checked=checked,
        )

    def every_split() -> Datasets:
        return Datasets(**{name: make(name) for name in names})

    if frozen:
        return with_features(cfg, every_split(), make("every"), model)
    if d.cache_dir is None or get_world_size() == 1 or not collective:
        return every_split()
    # under DDP rank 0 decodes the cache once; the other ranks then map its files, or
    # raise rank 0's error (waiting at a barrier, they would only see a lost peer or a
    # timeout)
    first, failure = None, [None]
    if get_rank() == 0:
        try:
            first = every_split()
        except Exception as e:
            failure = [f"{type(e).__name__}: {e}"]
            torch.distributed.broadcast_object_list(failure, src=0)
            raise
    torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RecipeError(f"rank 0 could not build the decoded cache: {failure[0]}")
    return first if first is not None else every_split()


def with_features(
    cfg: Config, images: Datasets, every: BreakHisDataset, model: EmbeddingNet
) -> Datasets:
    """``images`` (evaluation transform) as datasets of ``model``'s frozen-backbone
    features: one `FeatureCache` of every image of the data (``every``), computed once per
    image and each of ``data.feature_views`` views under ``data.cache_dir`` (default
    `default_cache_dir`). Its key holds the images, the backbone's actual weights
    (`module_digest`), input size and normalisation, and no split: every run, fold and
    method with the same backbone and data reads the same features.

    Args:
        cfg: the run's `Config`.
        images: the run's image datasets (made with the evaluation transform).
        every: every image of the data, with the evaluation transform.
        model: the network with the frozen backbone, on its device.
    """
    d = cfg.data
    device = next(model.parameters()).device
    key = {
        **feature_key(
            cfg.model.backbone,
            None,
            d.image_size,
            d.mean,
            d.std,
            d.interpolation or "bilinear",
        ),
        "state": module_digest(model.backbone),
        # what the weights do not show: layers without parameters, the pooling
        "backbone_kwargs": {k: str(v) for k, v in sorted(model.backbone_kwargs.items())},
        "pool": model.pool,
    }
    paths = list(every.paths)
    pos = {p: i for i, p in enumerate(paths)}
    cache = FeatureCache(
        paths,
        lambda p: every[pos[p]][0],
        lambda x: model.features(x.to(device)),
        model.embed.in_features,
        Path(d.cache_dir) if d.cache_dir else default_cache_dir(),
        key,
        views=d.feature_views,
    )
    out = Datasets()
    for name, ds in images.made().items():
        rows = [pos[p] for p in ds.paths]
        setattr(out, name, FeatureDataset(ds, cache, rows, name == "train", cfg.run.seed))
    return out


#: images per evaluation batch
EVAL_BATCH = 64


def eval_rows(n: int) -> slice:
    """This rank's rows of an evaluation set of ``n`` images: whole batches of the
    single-process order (`EVAL_BATCH`), split evenly by batch over the ranks, so that
    every image is embedded once, in a batch of the same images as one process uses
    (and so bit for bit alike); all rows without a process group.

    Args:
        n: images in the set.

    Examples:
        >>> eval_rows(150)  # one process
        slice(0, 150, None)
    """
    world, rank = get_world_size(), get_rank()
    batches = -(-n // EVAL_BATCH)
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    return slice(min(n, lo * EVAL_BATCH), min(n, hi * EVAL_BATCH))


def eval_loader(ds: BreakHisDataset, num_workers: int = 0, rows: slice | None = None) -> DataLoader:
    """Batches of `EVAL_BATCH` in order.

    Args:
        ds: the dataset to read.
        num_workers: loader worker processes (``data.num_workers``).
        rows: read only these rows (`eval_rows`: this rank's), or all.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology import load_config
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> from smse_metric.recipes.histopathology.splits import load_splits
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> cfg = load_config(overrides={"data": {"path": str(root), "image_size": [16, 16],
        ...                                       "num_workers": 0}})
        >>> images, labels, patients, mags = next(iter(eval_loader(
        ...     make_datasets(cfg, load_splits(cfg, root)).test)))
        >>> images.shape[1:]
        torch.Size([3, 16, 16])
    """
    data = ds if rows is None else Subset(ds, range(*rows.indices(len(ds))))
    return DataLoader(data, batch_size=EVAL_BATCH, shuffle=False, num_workers=num_workers)


def train_loader(cfg: Config, ds: BreakHisDataset, pin_memory: bool = False) -> DataLoader:
    """Training batches: multi-scale (classes x patients x magnifications) or
    frequency-ordered, per ``sampler.kind``, resumable mid-epoch.

    Args:
        cfg: the run's `Config`.
        ds: the training dataset.
        pin_memory: batches in page-locked memory (for a GPU).

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology import load_config
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> from smse_metric.recipes.histopathology.splits import load_splits
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> cfg = load_config(overrides={"data": {"path": str(root), "image_size": [16, 16],
        ...                                       "num_workers": 0}})
        >>> loader = train_loader(cfg, make_datasets(cfg, load_splits(cfg, root)).train)
        >>> len(next(iter(loader.batch_sampler)))  # 2 classes x 4 patients x 4 magnifications
        32
    """
    try:
        if cfg.sampler.kind == "multiscale":
            inner = MultiScaleBatchSampler(
                ds.labels,
                ds.groups,
                ds.scales,
                cfg.sampler.classes_per_batch,
                cfg.sampler.groups_per_class,
                cfg.sampler.images_per_scale,
                seed=cfg.run.seed,
            )
        else:
            inner = ShuffledBatchSampler(len(ds), cfg.sampler.batch_size, seed=cfg.run.seed)
    except ValueError as e:  # the [sampler] section does not fit the training data
        raise RecipeError(f"[sampler] on the training split: {e}") from e
    # pinned pages let the batch's copy to a GPU overlap the step (non_blocking)
    return DataLoader(
        ds,
        batch_sampler=inner,
        num_workers=cfg.data.num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_records if ds.on_device else None,
    )
