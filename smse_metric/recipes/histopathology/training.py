"""The SMSE recipe on BreakHis-layout data: data splits, training, evaluation.

``train(cfg, out_dir)`` fits the model of a
[`Config`][smse_metric.recipes.histopathology.Config] on the
training patients, selects the epoch on a validation split drawn from the training
patients (never on test), and evaluates the selected checkpoint on the test patients
with kNN over the training embeddings and with the classifier head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from smse_metric.distributed import get_world_size, is_main_process
from smse_metric.evaluation import FaissIndex, evaluate_embeddings, evaluate_predictions
from smse_metric.losses import ContrastiveLoss, FocalLoss, ReinforcedFocalLoss, TripletMarginLoss
from smse_metric.samplers import MultiScaleBatchSampler

from .config import Config, config_to_toml, load_config
from .data import BreakHisIndex, load_folds, patient_split, scan_breakhis
from .data.breakhis import check_patient_disjoint
from .data.dataset import BreakHisDataset
from .engine import (
    Interrupt,
    ResumableBatches,
    ShuffledBatchSampler,
    TrainingInterrupted,
    embed,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
    train_step,
)
from .models import EmbeddingNet
from .rundir import RUN_MARKER

__all__ = [
    "Splits",
    "TrainingInterrupted",
    "build_model",
    "data_root",
    "device_of",
    "evaluate_run",
    "evaluate_split",
    "load_splits",
    "resolve_inputs",
    "split_sizes",
    "train",
]


@dataclass
class Splits:
    """The scanned data and three patient-disjoint boolean masks over it.

    Attributes:
        index: the scanned images of the configured magnifications.
        train: [N] bool: training patients' images.
        val: [N] bool: validation patients' images (drawn from the training ones).
        test: [N] bool: test patients' images.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> from smse_metric.recipes.histopathology import load_config
        >>> s = load_splits(load_config("smse-triplet", {"data": {"synthetic": True}}), root)
        >>> bool((s.train | s.val | s.test).all()), bool((s.train & s.test).any())
        (True, False)
    """

    index: BreakHisIndex
    train: np.ndarray  #: boolean masks over ``index``
    val: np.ndarray
    test: np.ndarray


def _folds_file(cfg: Config, root: Path) -> Path | None:
    """``data.folds_file`` (``{fold}`` is replaced by the fold), else ``root/Folds.csv``,
    else ``root/dsfold<fold>.txt``, else None."""
    if cfg.data.folds_file:
        path = Path(cfg.data.folds_file.format(fold=cfg.data.fold))
        if not path.is_file():
            raise ValueError(f"data.folds_file {path} does not exist")
        return path
    for path in (root / "Folds.csv", root / f"dsfold{cfg.data.fold}.txt"):
        if path.is_file():
            return path
    return None


def load_splits(cfg: Config, root: str | Path) -> Splits:
    """Scan ``root``, keep the configured magnifications, and split patients: the fold
    file's train/test (``data.folds_file``, ``root/Folds.csv`` or
    ``root/dsfold<fold>.txt``) or, without one, `patient_split`; validation
    patients are drawn from the training ones.

    Args:
        cfg: the run's validated `Config`.
        root: the BreakHis-layout data directory.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"path": str(root), "fold": 2}})
        >>> s = load_splits(cfg, root)  # fold 2 of root/Folds.csv, validation from training
        >>> int(s.train.sum()) > int(s.val.sum()) > 0
        True
    """
    index = scan_breakhis(root, group_by=cfg.data.group_by)
    keep = np.isin(index.magnification, cfg.data.magnifications)
    folds = _folds_file(cfg, Path(root))
    if folds is not None:  # fold files list every magnification: match, then restrict
        masks = index.masks(load_folds(folds, cfg.data.fold))
        index = index.subset(keep)
        train, test = masks["train"][keep], masks["test"][keep]
    else:
        index = index.subset(keep)
        split = patient_split(index, cfg.data.test_fraction, 0.0, seed=cfg.run.seed)
        train, test = split["train"], split["test"]
    val = _validation_patients(cfg, index, train)
    train = train & ~val
    for name, m in (("train", train), ("validation", val), ("test", test)):
        if not m.any():
            raise ValueError(f"the {name} split is empty: too few patients for the fractions")
    check_patient_disjoint({"train": train, "val": val, "test": test}, index.group)
    return Splits(index, train, val, test)


def _validation_patients(cfg: Config, index: BreakHisIndex, train: np.ndarray) -> np.ndarray:
    """Validation patients drawn per class from the training patients: a
    ``val_fraction`` of each class's, at least ``min_val_patients_per_class``, and never
    a class's last training patient. Too few patients raise (or warn, by config)."""
    labels = index.label if cfg.data.task == "binary" else index.subtype
    names = index.label_names if cfg.data.task == "binary" else index.subtype_names
    rng = np.random.default_rng([cfg.run.seed, 1])
    want_min, val = cfg.data.min_val_patients_per_class, np.zeros(len(index), dtype=bool)
    short = []
    for c in np.unique(labels[train]):
        patients = np.unique(index.group[train & (labels == c)])
        want = max(want_min, round(cfg.data.val_fraction * len(patients)))
        take = min(want, len(patients) - 1)
        if take < want_min:
            short.append(f"{names[c]}: {len(patients)} training patients")
        chosen = rng.permutation(patients)[:take]
        val |= train & np.isin(index.group, chosen)
    if short:
        msg = (f"validation needs at least {want_min} patients of each class and one left "
               f"to train on, but {'; '.join(short)} (lower data.min_val_patients_per_class "
               "or set data.small_validation = \"warn\")")  # fmt: skip
        if cfg.data.small_validation == "error":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return val


def split_sizes(splits: Splits) -> str:
    """One line: images and patients of each split.

    Args:
        splits: the run's `Splits`.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> from smse_metric.recipes.histopathology import load_config
        >>> print(split_sizes(load_splits(load_config(overrides={"data": {"path": str(root)}}),
        ...                               root)))
        train 59 images / 11 patients, validation 21 / 4, test 45 / 9
    """
    parts = []
    for name, mask in (("train", splits.train), ("validation", splits.val),
                       ("test", splits.test)):  # fmt: skip
        n, p = int(mask.sum()), len(np.unique(splits.index.group[mask]))
        parts.append(f"{name} {n} images / {p} patients" if name == "train" else
                     f"{name} {n} / {p}")  # fmt: skip
    return ", ".join(parts)


def data_root(cfg: Config, run_dir: str | Path) -> Path:
    """The data a run trains on: ``data.path``, or ``RUN_DIR/data`` for synthetic runs.

    Args:
        cfg: the run's validated `Config`.
        run_dir: the run directory (synthetic data lives in ``run_dir/data``).

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> synthetic = load_config(overrides={"data": {"synthetic": True}})
        >>> data_root(synthetic, "runs/a").as_posix()
        'runs/a/data'
        >>> real = load_config(overrides={"data": {"path": "/data/BreaKHis"}})
        >>> data_root(real, "runs/a").as_posix()
        '/data/BreaKHis'
    """
    return Path(cfg.data.path) if cfg.data.path else Path(run_dir) / "data"


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
        raise ValueError("run.device = 'cuda' but no CUDA device is available")
    else:
        kind = cfg.run.device
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _amp(cfg: Config, device: torch.device):
    """(autocast dtype or None, GradScaler or None): bf16 where the GPU has it."""
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
    return dataclasses.replace(cfg, data=dataclasses.replace(
        d, mean=list(own["mean"]) if d.mean is None else d.mean,
        std=list(own["std"]) if d.std is None else d.std,
        interpolation=own["interpolation"] if d.interpolation is None else d.interpolation,
    ))  # fmt: skip


def _datasets(cfg: Config, splits: Splits) -> dict[str, BreakHisDataset]:
    size = tuple(cfg.data.image_size)

    def make(mask, transform):
        return BreakHisDataset(splits.index.subset(mask), transform, size=size,
                               task=cfg.data.task, seed=cfg.run.seed,
                               skip_bad_images=cfg.data.skip_bad_images, mean=cfg.data.mean,
                               std=cfg.data.std,
                               interpolation=cfg.data.interpolation or "bilinear")  # fmt: skip

    return {
        "train": make(splits.train, "train"),
        "gallery": make(splits.train, "eval"),
        "val": make(splits.val, "eval"),
        "test": make(splits.test, "eval"),
    }


def _eval_loader(cfg: Config, ds: BreakHisDataset) -> DataLoader:
    return DataLoader(ds, batch_size=64, shuffle=False, num_workers=cfg.data.num_workers)


def _train_loader(cfg: Config, ds: BreakHisDataset) -> DataLoader:
    if cfg.sampler.kind == "multiscale":
        inner = MultiScaleBatchSampler(
            ds.labels, ds.groups, ds.scales, cfg.sampler.classes_per_batch,
            cfg.sampler.groups_per_class, cfg.sampler.images_per_scale, seed=cfg.run.seed,
        )  # fmt: skip
    else:
        inner = ShuffledBatchSampler(len(ds), cfg.sampler.batch_size, seed=cfg.run.seed)
    return DataLoader(ds, batch_sampler=ResumableBatches(inner),
                      num_workers=cfg.data.num_workers)  # fmt: skip


def _losses(cfg: Config, class_counts: np.ndarray):
    lc = cfg.loss
    metric = None
    if lc.metric == "triplet":
        metric = TripletMarginLoss(lc.margin, lc.squared, lc.triplets, cross_scale=lc.cross_scale)
    elif lc.metric == "pair":
        metric = ContrastiveLoss(lc.margin, cross_scale=lc.cross_scale)
    if lc.classification == "rfl":
        cls = (ReinforcedFocalLoss.from_class_counts(class_counts, lc.alpha, lc.gamma)
               if lc.beta_from_counts else ReinforcedFocalLoss(lc.alpha, lc.gamma))  # fmt: skip
    elif lc.classification == "focal":
        cls = FocalLoss(lc.gamma)
    else:
        cls = torch.nn.CrossEntropyLoss()
    return metric, cls


def _num_classes(cfg: Config) -> int:
    return 2 if cfg.data.task == "binary" else 8


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
    return EmbeddingNet(cfg.model.backbone, cfg.model.pretrained, cfg.model.embedding_dim,
                        _num_classes(cfg), cfg.model.normalize, cfg.model.weights)  # fmt: skip


def _optimizer(cfg: Config, model: torch.nn.Module):
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    optimizer = opt_cls[cfg.optim.name](model.parameters(), lr=cfg.optim.lr,
                                        weight_decay=cfg.optim.weight_decay)  # fmt: skip
    scheduler = None
    if cfg.optim.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.optim.step_size,
                                                    cfg.optim.step_gamma)  # fmt: skip
    elif cfg.optim.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.optim.epochs)
    return optimizer, scheduler


def evaluate_split(
    cfg: Config,
    model: EmbeddingNet,
    gallery: BreakHisDataset,
    queries: BreakHisDataset,
    device: torch.device,
    channels_last: bool = False,
) -> dict:
    """kNN (gallery: training images) and head metrics of one split, as dicts.

    Args:
        cfg: the run's validated `Config`.
        model: the network, returning ``(embeddings, logits)``.
        gallery: the kNN gallery dataset (the training images, untransformed).
        queries: the dataset to score (validation or test).
        device: where to embed.
        channels_last: feed images in channels-last memory format (GPUs).

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"synthetic": True, "image_size": [16, 16],
        ...                                             "num_workers": 0}})
        >>> s = load_splits(cfg, root)
        >>> ds = _datasets(cfg, s)
        >>> cpu = torch.device("cpu")
        >>> out = evaluate_split(cfg, build_model(cfg), ds["gallery"], ds["val"], cpu)
        >>> sorted(out), 0 <= out["knn"]["pooled"]["patient_accuracy"] <= 1
        (['head', 'knn'], True)
    """
    g_emb, _ = embed(model, _eval_loader(cfg, gallery), device, channels_last)
    q_emb, q_pred = embed(model, _eval_loader(cfg, queries), device, channels_last)
    return _reports(cfg, (g_emb, gallery), (q_emb, q_pred, queries))


def _reports(cfg: Config, gallery, queries) -> dict:
    (g_emb, g), (q_emb, q_pred, q) = gallery, queries
    knn = evaluate_embeddings(
        q_emb, q.labels, q.groups, q.scales, k=cfg.eval.k, exclude=cfg.eval.exclude,
        gallery=(g_emb, g.labels, g.groups, g.scales), metric=cfg.eval.metric, map_at_r=False,
    )  # fmt: skip
    head = evaluate_predictions(q_pred.numpy(), q.labels, q.groups, q.scales,
                                classes=np.arange(_num_classes(cfg)))  # fmt: skip
    return {"knn": knn.to_dict(), "head": head.to_dict()}


class _Progress:
    """A tqdm bar on a terminal (rank 0), nothing elsewhere."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    cfg: Config,
    out_dir: str | Path,
    root: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> dict | None:
    """Train on ``root`` (a BreakHis-layout directory), write ``out_dir``, return metrics.

    Writes ``config.toml``, ``history.jsonl`` (one line per epoch),
    ``checkpoints/{last,best}.pt`` (``last`` after every epoch and on Ctrl-C) and then
    everything `evaluate_run` writes. ``resume=True`` continues from
    ``checkpoints/last.pt`` (mid-epoch after an interruption) to the same result as an
    uninterrupted run. Under ``torchrun`` it trains with DDP; only rank 0 writes and
    returns metrics (other ranks return ``None``).

    Args:
        cfg: the run's validated `Config`.
        out_dir: the run directory to write.
        root: the data directory (default: ``data.path``, or ``out_dir/data`` when synthetic).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        on_step: called after every step with ``{epoch, step, loss}`` (tests, logging).
        quiet: print nothing (no split sizes, no per-epoch lines, no progress bar).

    Raises:
        TrainingInterrupted: after SIGINT / SIGTERM, once ``last.pt`` is written.
        FloatingPointError: on a non-finite loss, naming the step; ``last.pt`` keeps
            the last good epoch.

    Examples:
        Two epochs on the synthetic dataset (tests/test_recipe.py runs this path; skipped
        here because it trains a network):

        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"synthetic": True}, "optim": {"epochs": 2}})
        >>> metrics = train(cfg, "runs/example")  # doctest: +SKIP
        >>> metrics["test"]["knn"]["pooled"]["patient_accuracy"]  # doctest: +SKIP
        0.8...
    """
    out = Path(out_dir)
    root = data_root(cfg, out) if root is None else Path(root)
    if root.resolve() != (out / "data").resolve():  # config.toml must name the data
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(root.resolve())))
    cfg = resolve_inputs(cfg)
    device = device_of(cfg)
    own_group = init_distributed(device.type)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        return _train(cfg, out, root, resume, on_step, quiet, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if own_group:
            dist.destroy_process_group()


def _train(cfg, out, root, resume, on_step, quiet, device):
    main = is_main_process()
    world = get_world_size()
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg, root)  # inputs validated before anything is written
    ds = _datasets(cfg, splits)
    say = print if main and not quiet else (lambda *a, **k: None)
    say(f"data: {split_sizes(splits)}", flush=True)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():
            (out / RUN_MARKER).write_text("created by smse-metric\n")
        (out / "config.toml").write_text(config_to_toml(cfg))
    model = build_model(cfg).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    metric_loss, cls_loss = _losses(cfg, np.bincount(ds["train"].labels,
                                                     minlength=_num_classes(cfg)))  # fmt: skip
    cls_loss = cls_loss.to(device)
    optimizer, scheduler = _optimizer(cfg, model)
    amp_dtype, scaler = _amp(cfg, device)
    loader = _train_loader(cfg, ds["train"])
    batches = loader.batch_sampler

    progress = {"epoch": 0, "position": 0, "loss_sum": 0.0, "steps": 0, "seen": 0,
                "seconds": 0.0, "best": -math.inf, "best_epoch": -1, "stale": 0,
                "done": False}  # fmt: skip
    history: list[dict] = []  # saved in last.pt: the file is rewritten from it
    if resume:
        state = load_checkpoint(ckpt_dir / "last.pt", device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        progress.update(state["progress"])
        history = list(state.get("history", []))

    net = model
    if world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    def state_dict() -> dict:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": torch.get_rng_state(), "progress": dict(progress), "history": list(history),
        }  # fmt: skip

    def save_last() -> None:
        # the checkpoint first, then the history written from it: a kill between the
        # two leaves a history that the next --resume rewrites, never a duplicate epoch
        save_checkpoint(ckpt_dir / "last.pt", state_dict())
        _write_history(out / "history.jsonl", history)

    with Interrupt() as interrupt:
        while not progress["done"] and progress["epoch"] < cfg.optim.epochs:
            epoch = progress["epoch"]
            net.train()
            ds["train"].set_epoch(epoch)
            batches.set_epoch(epoch)
            batches.skip = progress["position"]
            bar = _Progress(len(batches), f"epoch {epoch}", main and not quiet)
            t0 = time.perf_counter()
            for images, labels, _, scales in loader:
                images, labels, scales = (t.to(device, non_blocking=True)
                                          for t in (images, labels, scales))  # fmt: skip
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                loss = train_step(net, images, labels, scales, optimizer, cls_loss,
                                  metric_loss, cfg.loss.metric_weight,
                                  cfg.loss.classification_weight, amp_dtype, scaler)  # fmt: skip
                # one host sync per step: the loss for the log, and the stop flag agreed
                # by every rank (a Ctrl-C reaches ranks at different steps)
                flags = torch.stack([loss.float(), _flag(interrupt.requested, device)])
                if world > 1:
                    dist.all_reduce(flags)
                    flags[0] /= world
                loss_value, stop = flags.tolist()
                step = progress["position"]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"non-finite loss ({loss_value}) at epoch {epoch} step {step}; "
                        f"{ckpt_dir / 'last.pt'} holds the last good epoch"
                    )
                progress["position"] += 1
                progress["loss_sum"] += loss_value
                progress["steps"] += 1
                progress["seen"] += len(images) * world
                bar.update(loss_value, progress["seen"] / max(time.perf_counter() - t0, 1e-9))
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step, "loss": loss_value})
                if stop:
                    progress["seconds"] += time.perf_counter() - t0
                    bar.close()
                    if main:
                        save_last()
                    raise TrainingInterrupted(ckpt_dir / "last.pt", epoch, step)
            bar.close()
            progress["seconds"] += time.perf_counter() - t0
            if scheduler is not None:
                scheduler.step()
            _end_epoch(cfg, model, ds, device, channels_last, progress, history, main)
            if main:
                if progress["best_epoch"] == epoch:  # weights only: optimiser state in last
                    save_checkpoint(ckpt_dir / "best.pt", {"model": model.state_dict(),
                                                           "progress": dict(progress)})  # fmt: skip
                save_last()
                say(_epoch_line(history[-1], cfg, progress), flush=True)
            more = not progress["done"] and progress["epoch"] < cfg.optim.epochs
            if more and _any_rank(interrupt.requested, device):
                raise TrainingInterrupted(ckpt_dir / "last.pt", epoch + 1, 0)
    if not main:
        return None
    return evaluate_run(out, root, device=device, cfg=cfg, model=model,
                        bad_images=_bad_images(ds))  # fmt: skip


def _flag(value: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(value), device=device)


def _any_rank(value: bool, device: torch.device) -> bool:
    flag = _flag(value, device)
    if get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _end_epoch(cfg, model, ds, device, channels_last, progress, history, main) -> None:
    """Validation on rank 0, its verdict shared; the progress moves to the next epoch."""
    epoch = progress["epoch"]
    verdict = torch.zeros(2)
    if main:
        val = evaluate_split(cfg, model, ds["gallery"], ds["val"], device, channels_last)
        score = val[cfg.eval.select]["pooled"]["patient_accuracy"]
        record = {
            "epoch": epoch, "loss": progress["loss_sum"] / max(progress["steps"], 1),
            "images_per_s": progress["seen"] / max(progress["seconds"], 1e-9),
            "seconds": progress["seconds"],
            "val_score": score,
            "val_patient_accuracy": val["knn"]["pooled"]["patient_accuracy"],
            "val_accuracy": val["knn"]["pooled"]["accuracy"],
            "val_head_patient_accuracy": val["head"]["pooled"]["patient_accuracy"],
            "val_head_accuracy": val["head"]["pooled"]["accuracy"],
        }  # fmt: skip
        history.append(record)
        verdict[0] = float(score > progress["best"])
        verdict[1] = score
    if get_world_size() > 1:
        verdict = verdict.to(device)
        dist.broadcast(verdict, 0)
    improved, score = verdict.tolist()
    if improved:
        progress.update(best=score, best_epoch=epoch, stale=0)
    else:
        progress["stale"] += 1
        if cfg.optim.patience and progress["stale"] >= cfg.optim.patience:
            progress["done"] = True
    progress.update(epoch=epoch + 1, position=0, loss_sum=0.0, steps=0, seen=0, seconds=0.0)


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


def _epoch_line(record: dict, cfg: Config, progress: dict) -> str:
    return (f"epoch {record['epoch'] + 1}/{cfg.optim.epochs}  loss {record['loss']:.4f}  "
            f"val {cfg.eval.select} patient acc {record['val_score']:.3f} "
            f"(kNN {record['val_patient_accuracy']:.3f}, head "
            f"{record['val_head_patient_accuracy']:.3f}; best {progress['best']:.3f} at epoch "
            f"{progress['best_epoch'] + 1})  {record['images_per_s']:.0f} img/s  "
            f"{record['seconds']:.1f} s")  # fmt: skip


def _bad_images(ds: dict[str, BreakHisDataset]) -> list[list[str]]:
    seen, out = set(), []
    for d in ds.values():
        for path, why in d.bad_images:
            if path not in seen:
                seen.add(path)
                out.append([path, why])
    return out


def _save_embeddings(path: Path, emb: torch.Tensor, ds: BreakHisDataset) -> None:
    idx = ds.index.subset(ds.rows)
    np.savez(
        path, embeddings=emb.numpy().astype(np.float32), labels=ds.labels,
        subtypes=idx.subtype, groups=np.array([idx.group_names[g] for g in idx.group], dtype=str),
        magnifications=ds.scales, paths=np.array(ds.paths, dtype=str),
    )  # fmt: skip


def evaluate_run(
    run_dir: str | Path,
    root: str | Path | None = None,
    device: torch.device | str | None = None,
    cfg: Config | None = None,
    model: EmbeddingNet | None = None,
    bad_images: list | None = None,
) -> dict:
    """Evaluate a run's ``checkpoints/best.pt`` on its test patients and write
    ``metrics.json``, ``embeddings/{gallery,test}.npz``, ``index/gallery.faiss`` (the
    kNN gallery that ``search`` queries) and ``report.md`` with its plots.

    Args:
        run_dir: a run directory with ``config.toml`` and ``checkpoints/best.pt``.
        root: the data directory, if it moved since training (default: the config's).
        device: where to embed (default: the config's ``run.device``).
        cfg: the run's config, when the caller has it (default: ``config.toml``).
        model: a network to load ``best.pt`` into (default: built from the config).
        bad_images: unreadable images already found, to list in the report.

    Examples:
        Recompute a finished run's outputs (tests/test_recipe.py runs this; skipped here
        because it needs a trained run):

        >>> metrics = evaluate_run("runs/example")  # doctest: +SKIP
        >>> sorted(metrics["test"])  # doctest: +SKIP
        ['head', 'knn']
    """
    from .report import write_report

    out = Path(run_dir)
    cfg = resolve_inputs(load_config(out / "config.toml")) if cfg is None else cfg
    root = data_root(cfg, out) if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"the run's data {root} does not exist (moved? pass --data DIR)")
    device = device_of(cfg) if device is None else torch.device(device)
    splits = load_splits(cfg, root)
    ds = _datasets(cfg, splits)
    model = build_model(cfg) if model is None else model
    state = load_checkpoint(out / "checkpoints" / "best.pt", device)
    model.load_state_dict(state["model"])
    model.to(device)
    channels_last = device.type == "cuda"
    g_emb, _ = embed(model, _eval_loader(cfg, ds["gallery"]), device, channels_last)
    q_emb, q_pred = embed(model, _eval_loader(cfg, ds["test"]), device, channels_last)
    test = _reports(cfg, (g_emb, ds["gallery"]), (q_emb, q_pred, ds["test"]))
    progress = state["progress"]
    metrics = {
        "best_epoch": int(progress["best_epoch"]),
        "selected_on": f"validation {cfg.eval.select} patient accuracy",
        "best_val_score": float(progress["best"]),
        "test": test,
        "splits": {k: int(getattr(splits, k).sum()) for k in ("train", "val", "test")},
        "data": splits.index.report,
        "bad_images": _bad_images(ds) if bad_images is None else bad_images,
    }
    (out / "embeddings").mkdir(exist_ok=True)
    _save_embeddings(out / "embeddings" / "gallery.npz", g_emb, ds["gallery"])
    _save_embeddings(out / "embeddings" / "test.npz", q_emb, ds["test"])
    (out / "index").mkdir(exist_ok=True)
    FaissIndex(g_emb, metric=cfg.eval.metric, device="cpu").save(out / "index" / "gallery.faiss")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out)
    return metrics
