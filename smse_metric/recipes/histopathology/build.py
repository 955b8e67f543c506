"""The objects a run is made of, built from its validated config: device, inputs,
datasets and loaders, network, losses, optimiser."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from smse_metric.distributed import get_rank, get_world_size
from smse_metric.losses import ContrastiveLoss, FocalLoss, ReinforcedFocalLoss, TripletMarginLoss
from smse_metric.samplers import MultiScaleBatchSampler, ShuffledBatchSampler

from .config import Config
from .data.breakhis import class_names
from .data.dataset import BreakHisDataset, collate_records
from .errors import RecipeError
from .models import EmbeddingNet
from .splits import Splits
from .step import LossFn, StepLoss, make_step_loss

__all__ = [
    "Built",
    "Datasets",
    "amp_setup",
    "build",
    "build_model",
    "device_of",
    "eval_loader",
    "make_datasets",
    "make_losses",
    "make_optimizer",
    "num_classes",
    "resolve_inputs",
    "train_loader",
]


def device_of(cfg: Config) -> torch.device:
    """The run's device: ``run.device`` (``auto``: CUDA when present), this rank's GPU.

    Args:
        cfg: the run's validated `Config`.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> device_of(load_config(overrides={"data": {"synthetic": True},
        ...                                  "run": {"device": "cpu"}}))
        device(type='cpu')
    """
    if cfg.run.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("run.device = 'cuda' but no CUDA device is available")
    else:
        kind = cfg.run.device
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def amp_setup(
    cfg: Config, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype or None, GradScaler or None)``: bf16 where the GPU has it, else
    fp16 with a gradient scaler; nothing on the CPU or with ``run.amp = false``.

    Args:
        cfg: the run's `Config`.
        device: where the run trains.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> amp_setup(load_config(overrides={"data": {"synthetic": True}}), torch.device("cpu"))
        (None, None)
    """
    if not (cfg.run.amp and device.type == "cuda"):
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def resolve_inputs(cfg: Config, model: EmbeddingNet | None = None) -> Config:
    """``cfg`` with ``data.mean``, ``data.std`` and ``data.interpolation`` filled from the
    backbone's data config where the config leaves them empty (a key set in the config
    wins), so that training, evaluation and search normalise alike.

    Args:
        cfg: the run's validated `Config`.
        model: the network whose backbone to ask (default: built from ``cfg``).

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = resolve_inputs(load_config(overrides={"data": {"synthetic": True}}))
        >>> cfg.data.mean, cfg.data.std  # resnet18: ImageNet's
        ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    """
    d = cfg.data
    if d.mean is not None and d.interpolation is not None:
        return cfg
    from .models import backbone_data_config

    own = backbone_data_config((model or build_model(cfg)).backbone)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            d,
            mean=list(own["mean"]) if d.mean is None else d.mean,
            std=list(own["std"]) if d.std is None else d.std,
            interpolation=own["interpolation"] if d.interpolation is None else d.interpolation,
        ),
    )


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
) -> Datasets:
    """The run's datasets named in ``names``, normalised as ``cfg.data`` says.

    Args:
        cfg: the run's `Config` (``data.mean`` etc. resolved, see `resolve_inputs`).
        splits: the run's `Splits`.
        names: which of ``train``, ``gallery``, ``val``, ``test`` to make.
        collective: every rank of a process group calls this together (rank 0 then
            builds a decoded cache first, the others wait for it); False for a call of
            one rank alone.

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

    def make(name: str) -> BreakHisDataset:
        transform = "train" if name == "train" else "eval"
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
            cache_dir=d.cache_dir,
            # device augmentation is the training transform's; evaluation images are finished
            augment_on=d.augment_on if transform == "train" else "worker",
            max_image_pixels=d.max_image_pixels,
            checked=checked,
        )

    def every_split() -> Datasets:
        return Datasets(**{name: make(name) for name in names})

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


def eval_loader(cfg: Config, ds: BreakHisDataset) -> DataLoader:
    """Batches of 64 in order, with ``data.num_workers`` workers.

    Args:
        cfg: the run's `Config`.
        ds: the dataset to read.

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
        ...     cfg, make_datasets(cfg, load_splits(cfg, root)).test)))
        >>> images.shape[1:]
        torch.Size([3, 16, 16])
    """
    return DataLoader(ds, batch_size=64, shuffle=False, num_workers=cfg.data.num_workers)


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


def make_losses(cfg: Config, class_counts: np.ndarray) -> StepLoss:
    """The step's loss as ``cfg.loss`` says: classification loss plus weighted metric
    loss (none for the baseline).

    Args:
        cfg: the run's `Config`.
        class_counts: [C] training images per class (the RFL's ``beta``).

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> loss = make_losses(load_config(overrides={"data": {"synthetic": True}}),
        ...                    np.array([30, 70]))
        >>> type(loss.metric_loss).__name__, type(loss.cls_loss).__name__
        ('TripletMarginLoss', 'ReinforcedFocalLoss')
    """
    lc = cfg.loss
    metric = None
    if lc.metric == "triplet":
        metric = TripletMarginLoss(lc.margin, lc.squared, lc.triplets, cross_scale=lc.cross_scale)
    elif lc.metric == "pair":
        metric = ContrastiveLoss(lc.margin, cross_scale=lc.cross_scale)
    if lc.classification == "rfl":
        cls = (
            ReinforcedFocalLoss.from_class_counts(class_counts, lc.alpha, lc.gamma)
            if lc.beta_from_counts
            else ReinforcedFocalLoss(lc.alpha, lc.gamma)
        )
    elif lc.classification == "focal":
        cls = FocalLoss(lc.gamma)
    else:
        cls = torch.nn.CrossEntropyLoss()
    return StepLoss(
        cls, metric, metric_weight=lc.metric_weight, cls_weight=lc.classification_weight
    )


def num_classes(cfg: Config) -> int:
    """2 for the binary task, 8 for subtypes.

    Args:
        cfg: the run's `Config`.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> num_classes(load_config(overrides={"data": {"synthetic": True, "task": "subtype"}}))
        8
    """
    return len(class_names(cfg.data.task))


def build_model(cfg: Config) -> EmbeddingNet:
    """The run's network, untrained (load ``checkpoints/best.pt`` into it).

    Args:
        cfg: the run's validated `Config`.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"synthetic": True, "task": "subtype"},
        ...                                    "model": {"embedding_dim": 32}})
        >>> emb, logits = build_model(cfg)(torch.randn(2, 3, 32, 32))
        >>> emb.shape, logits.shape
        (torch.Size([2, 32]), torch.Size([2, 8]))
    """
    return EmbeddingNet(
        cfg.model.backbone,
        cfg.model.pretrained,
        cfg.model.embedding_dim,
        num_classes(cfg),
        cfg.model.normalize,
        cfg.model.weights,
    )


def make_optimizer(
    cfg: Config, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``(optimiser, scheduler or None)`` as ``cfg.optim`` says.

    Args:
        cfg: the run's `Config`.
        model: the network whose parameters it trains.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config(overrides={"data": {"synthetic": True}})
        >>> opt, sched = make_optimizer(cfg, torch.nn.Linear(2, 2))
        >>> type(opt).__name__, type(sched).__name__
        ('Adam', 'StepLR')
    """
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    optimizer = opt_cls[cfg.optim.name](
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scheduler = None
    if cfg.optim.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, cfg.optim.step_size, cfg.optim.step_gamma
        )
    elif cfg.optim.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.optim.epochs)
    return optimizer, scheduler


@dataclasses.dataclass
class Built:
    """The objects of one training run, built once from its validated config by `build`.

    Attributes:
        device: where the run trains.
        datasets: its `Datasets` (all four).
        model: the network, on ``device`` (channels-last on CUDA).
        loss_fn: the step's loss (a `StepLoss`, or its CUDA-graph replay).
        optimizer: the optimiser over ``model``'s parameters.
        scheduler: the learning-rate schedule, or None.
        amp_dtype: the autocast dtype, or None.
        scaler: a ``GradScaler`` for float16 autocast, or None.
        loader: the training loader (its ``batch_sampler`` resumes mid-epoch).

    Examples:
        >>> [f.name for f in dataclasses.fields(Built)][:4]
        ['device', 'datasets', 'model', 'loss_fn']
    """

    device: torch.device
    datasets: Datasets
    model: EmbeddingNet
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    loader: DataLoader

    @property
    def channels_last(self) -> bool:
        """Whether images go to the network channels-last (on CUDA)."""
        return self.device.type == "cuda"


def build(cfg: Config, splits: Splits, device: torch.device, model: EmbeddingNet) -> Built:
    """Every object a training run needs, from its validated config, once.

    Args:
        cfg: the run's validated `Config` (inputs resolved by `resolve_inputs`).
        splits: its patient splits.
        device: where to train (`device_of`).
        model: the untrained network (`build_model`), moved to ``device`` here.

    Examples:
        Built by `train` before the first step (tests/recipes/histopathology/test_training.py
        runs it; skipped here because it needs a dataset on disk):

        >>> built = build(cfg, splits, device_of(cfg), build_model(cfg))  # doctest: +SKIP
        >>> type(built.optimizer).__name__  # doctest: +SKIP
        'Adam'
    """
    datasets = make_datasets(cfg, splits)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    counts = np.bincount(datasets.train.labels, minlength=num_classes(cfg))
    loss = make_losses(cfg, counts)
    loss.cls_loss.to(device)
    optimizer, scheduler = make_optimizer(cfg, model)
    amp_dtype, scaler = amp_setup(cfg, device)
    loader = train_loader(cfg, datasets.train, pin_memory=device.type == "cuda")
    loss_fn = make_step_loss(loss, device, cfg.run.cuda_graphs)
    return Built(device, datasets, model, loss_fn, optimizer, scheduler, amp_dtype, scaler, loader)
