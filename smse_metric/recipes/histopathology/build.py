"""The objects a run is made of, built from its validated config: device, inputs,
datasets and loaders, network, losses, optimiser."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import Config, DataConfig, LossConfig, OptimConfig
from .data.breakhis import class_names
from .errors import RecipeError
from .factories import (
    CLASSIFICATION_LOSSES,
    METRIC_DISTANCES,
    METRIC_LOSSES,
    OPTIMIZERS,
    SCHEDULES,
)
from .loaders import Datasets, make_datasets, train_loader
from .models import EmbeddingNet
from .splits import Splits
from .step import LossFn, StepLoss, make_step_loss

__all__ = [
    "Built",
    "amp_setup",
    "build",
    "build_model",
    "device_of",
    "make_losses",
    "make_optimizer",
    "num_classes",
    "resolve_inputs",
]


def device_of(device: str) -> torch.device:
    """The run's device (``auto``: CUDA when present); on CUDA this rank's GPU.

    Args:
        device: ``run.device``: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Examples:
        >>> device_of("cpu")
        device(type='cpu')
    """
    if device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("run.device = 'cuda' but no CUDA device is available")
    else:
        kind = device
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def amp_setup(
    amp: bool, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype or None, GradScaler or None)``: bf16 where the GPU has it, else
    fp16 with a gradient scaler; nothing on the CPU or with ``run.amp = false``.

    Args:
        amp: ``run.amp``.
        device: where the run trains.

    Examples:
        >>> amp_setup(True, torch.device("cpu"))
        (None, None)
    """
    if not (amp and device.type == "cuda"):
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def resolve_inputs(cfg: Config, model: EmbeddingNet | None = None) -> Config:
    """``cfg`` with ``data.mean``, ``data.std`` and ``data.interpolation`` filled from the
    backbone's data config where the config leaves them empty (a key set in the config
    wins), and ``model.backbone_kwargs`` / ``model.pool`` as the network was built, so
    that training, evaluation and search build and normalise alike.

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
    model = model or build_model(cfg)
    cfg = dataclasses.replace(  # what the network was built with, for evaluate and search
        cfg,
        model=dataclasses.replace(
            cfg.model, backbone_kwargs=dict(model.backbone_kwargs), pool=model.pool
        ),
    )
    if d.mean is not None and d.interpolation is not None:
        return cfg
    from .models import backbone_data_config

    own = backbone_data_config(model.backbone)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            d,
            mean=list(own["mean"]) if d.mean is None else d.mean,
            std=list(own["std"]) if d.std is None else d.std,
            interpolation=own["interpolation"] if d.interpolation is None else d.interpolation,
        ),
    )


def make_losses(lc: LossConfig, class_counts: np.ndarray) -> StepLoss:
    """The step's loss as ``[loss]`` says: classification loss plus weighted metric loss
    (none for the baseline), from the `factories` tables.

    Args:
        lc: the run's ``cfg.loss``.
        class_counts: [C] training images per class (the RFL's ``beta``).

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> loss = make_losses(load_config(overrides={"data": {"synthetic": True}}).loss,
        ...                    np.array([30, 70]))
        >>> type(loss.metric_loss).__name__, loss.metric_loss.distance
        ('TripletMarginLoss', 'squared_l2')
    """
    make_metric = METRIC_LOSSES[lc.metric]
    distance = lc.distance or METRIC_DISTANCES[lc.metric][0]
    return StepLoss(
        CLASSIFICATION_LOSSES[lc.classification](lc, class_counts),
        None if make_metric is None else make_metric(lc, distance),
        metric_weight=lc.metric_weight,
        cls_weight=lc.classification_weight,
    )


def num_classes(d: DataConfig) -> int:
    """The classifier's classes: 2 for the binary task, else the data's classes
    (``data.classes``; empty, as before a run resolves it: BreakHis's eight subtypes).

    Args:
        d: the run's ``cfg.data``.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> num_classes(load_config(overrides={"data": {"synthetic": True,
        ...                                             "task": "subtype"}}).data)
        8
    """
    if d.task == "subtype" and d.classes:
        return len(d.classes)
    return len(class_names(d.task))


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
        num_classes(cfg.data),
        cfg.model.normalize,
        cfg.model.weights,
        freeze_backbone=cfg.model.freeze_backbone,
        backbone_kwargs=cfg.model.backbone_kwargs,
        pool=cfg.model.pool,
    )


def make_optimizer(
    oc: OptimConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``(optimiser, scheduler or None)`` as ``[optim]`` says, from the `factories` tables.

    Args:
        oc: the run's ``cfg.optim``.
        model: the network whose parameters it trains.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config(overrides={"data": {"synthetic": True}})
        >>> opt, sched = make_optimizer(cfg.optim, torch.nn.Linear(2, 2))
        >>> type(opt).__name__, type(sched).__name__
        ('Adam', 'StepLR')
    """
    trained = [p for p in model.parameters() if p.requires_grad]  # a frozen backbone's: none
    optimizer = OPTIMIZERS[oc.name](trained, lr=oc.lr, weight_decay=oc.weight_decay)
    return optimizer, SCHEDULES[oc.schedule](optimizer, oc)


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

        >>> device = device_of(cfg.run.device)  # doctest: +SKIP
        >>> built = build(cfg, splits, device, build_model(cfg))  # doctest: +SKIP
        >>> type(built.optimizer).__name__  # doctest: +SKIP
        'Adam'
    """
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    datasets = make_datasets(cfg, splits, model=model)  # a frozen backbone fills its cache
    counts = np.bincount(datasets.train.labels, minlength=num_classes(cfg.data))
    loss = make_losses(cfg.loss, counts)
    loss.cls_loss.to(device)
    optimizer, scheduler = make_optimizer(cfg.optim, model)
    amp_dtype, scaler = amp_setup(cfg.run.amp, device)
    loader = train_loader(cfg, datasets.train, pin_memory=device.type == "cuda")
    loss_fn = make_step_loss(loss, device, cfg.run.cuda_graphs)
    return Built(device, datasets, model, loss_fn, optimizer, scheduler, amp_dtype, scaler, loader)
