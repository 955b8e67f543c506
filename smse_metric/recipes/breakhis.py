"""The SMSE recipe on BreakHis-layout data: data splits, training, evaluation.

``train(cfg, out_dir)`` fits the model of a :class:`~smse_metric.recipes.Config` on the
training patients, selects the epoch on a validation split drawn from the training
patients (never on test), and evaluates the selected checkpoint on the test patients
with kNN over the training embeddings and with the classifier head.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from ..data import BreakHisIndex, load_folds, patient_split, scan_breakhis
from ..data.breakhis import check_patient_disjoint
from ..data.dataset import BreakHisDataset
from ..evaluation import evaluate_embeddings, evaluate_predictions
from ..losses import ContrastiveLoss, FocalLoss, ReinforcedFocalLoss, TripletMarginLoss
from ..models import EmbeddingNet
from ..samplers import MultiScaleBatchSampler
from .config import Config, config_to_toml

__all__ = ["Splits", "evaluate_split", "load_splits", "save_checkpoint", "train"]


@dataclass
class Splits:
    index: BreakHisIndex
    train: np.ndarray  #: boolean masks over ``index``
    val: np.ndarray
    test: np.ndarray


def load_splits(cfg: Config, root: str | Path) -> Splits:
    """Scan ``root``, keep the configured magnifications, and split patients: the fold
    file's train/test (``data.folds_file`` or ``root/Folds.csv``) or, without one,
    :func:`patient_split`; validation patients are drawn from the training ones."""
    index = scan_breakhis(root, group_by=cfg.data.group_by)
    index = index.subset(np.isin(index.magnification, cfg.data.magnifications))
    folds = Path(cfg.data.folds_file) if cfg.data.folds_file else Path(root) / "Folds.csv"
    if folds.is_file():
        masks = index.masks(load_folds(folds, cfg.data.fold))
        train, test = masks["train"], masks["test"]
    else:
        split = patient_split(index, cfg.data.test_fraction, 0.0, seed=cfg.run.seed)
        train, test = split["train"], split["test"]
    inner = patient_split(index.subset(train), cfg.data.val_fraction, 0.0, seed=cfg.run.seed)
    val = np.zeros(len(index), dtype=bool)
    val[np.flatnonzero(train)[inner["test"]]] = True
    train = train & ~val
    for name, m in (("train", train), ("validation", val), ("test", test)):
        if not m.any():
            raise ValueError(f"the {name} split is empty: too few patients for the fractions")
    check_patient_disjoint({"train": train, "val": val, "test": test}, index.group)
    return Splits(index, train, val, test)


def _device(cfg: Config) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(cfg.run.device)


def _loader(cfg: Config, ds: BreakHisDataset, train: bool) -> DataLoader:
    kw = dict(num_workers=cfg.data.num_workers, persistent_workers=False)
    if not train:
        return DataLoader(ds, batch_size=64, shuffle=False, **kw)
    if cfg.sampler.kind == "multiscale":
        sampler = MultiScaleBatchSampler(
            ds.labels, ds.groups, ds.scales, cfg.sampler.classes_per_batch,
            cfg.sampler.groups_per_class, cfg.sampler.images_per_scale, seed=cfg.run.seed,
        )  # fmt: skip
    else:
        g = torch.Generator().manual_seed(cfg.run.seed)
        sampler = BatchSampler(RandomSampler(ds, generator=g), cfg.sampler.batch_size, True)
    return DataLoader(ds, batch_sampler=sampler, **kw)


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


@torch.no_grad()
def embed(model: EmbeddingNet, loader: DataLoader, device: torch.device):
    """Embeddings [N, D], head predictions [N] and the dataset's metadata, in order."""
    model.eval()
    embs, preds = [], []
    for images, *_ in loader:
        emb, logits = model(images.to(device))
        embs.append(emb.float().cpu())
        preds.append(logits.argmax(1).cpu())
    return torch.cat(embs), torch.cat(preds)


def evaluate_split(cfg, model, gallery_loader, query_loader, device) -> dict:
    """kNN (gallery = training images) and head metrics of one split, as dicts."""
    g_emb, _ = embed(model, gallery_loader, device)
    q_emb, q_pred = embed(model, query_loader, device)
    g, q = gallery_loader.dataset, query_loader.dataset
    knn = evaluate_embeddings(
        q_emb, q.labels, q.groups, q.scales, k=cfg.eval.k, exclude=cfg.eval.exclude,
        gallery=(g_emb, g.labels, g.groups, g.scales), metric=cfg.eval.metric, map_at_r=False,
    )  # fmt: skip
    head = evaluate_predictions(q_pred.numpy(), q.labels, q.groups, q.scales,
                                classes=np.unique(g.labels))  # fmt: skip
    return {"knn": knn.to_dict(), "head": head.to_dict()}


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, best: float) -> None:
    """Atomic write (temp file + rename); loadable with ``torch.load(weights_only=True)``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "epoch": epoch,
        "best_val": best,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(cfg: Config, out_dir: str | Path, root: str | Path) -> dict:
    """Train on ``root`` (a BreakHis-layout directory), write ``out_dir``, return metrics.

    Writes ``config.toml``, ``history.jsonl`` (one line per epoch),
    ``checkpoints/{last,best}.pt`` and ``metrics.json`` (test kNN and head reports of
    the best validation epoch).
    """
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config_to_toml(cfg))
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    device = _device(cfg)
    splits = load_splits(cfg, root)
    size = tuple(cfg.data.image_size)

    def dataset(mask, transform):
        return BreakHisDataset(splits.index.subset(mask), transform, size=size,
                               task=cfg.data.task, seed=cfg.run.seed)  # fmt: skip

    train_ds = dataset(splits.train, "train")
    n_classes = 2 if cfg.data.task == "binary" else 8
    model = EmbeddingNet(cfg.model.backbone, cfg.model.pretrained, cfg.model.embedding_dim,
                         n_classes, cfg.model.normalize, cfg.model.weights).to(device)  # fmt: skip
    metric_loss, cls_loss = _losses(cfg, np.bincount(train_ds.labels, minlength=n_classes))
    cls_loss = cls_loss.to(device)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    optimizer = opt_cls[cfg.optim.name](model.parameters(), lr=cfg.optim.lr,
                                        weight_decay=cfg.optim.weight_decay)  # fmt: skip
    scheduler = None
    if cfg.optim.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.optim.step_size,
                                                    cfg.optim.step_gamma)  # fmt: skip
    elif cfg.optim.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.optim.epochs)
    train_loader = _loader(cfg, train_ds, True)
    gallery_loader = _loader(cfg, dataset(splits.train, "eval"), False)
    val_loader = _loader(cfg, dataset(splits.val, "eval"), False)
    use_amp = cfg.run.amp and device.type == "cuda"

    best, best_epoch, stale = -math.inf, -1, 0
    history = out / "history.jsonl"
    history.write_text("")
    for epoch in range(cfg.optim.epochs):
        model.train()
        train_ds.set_epoch(epoch)
        if hasattr(train_loader.batch_sampler, "set_epoch"):
            train_loader.batch_sampler.set_epoch(epoch)
        t0, total, steps, seen = time.perf_counter(), 0.0, 0, 0
        for step, (images, labels, _, scales) in enumerate(train_loader):
            images, labels, scales = images.to(device), labels.to(device), scales.to(device)
            with torch.autocast(device.type, enabled=use_amp):
                emb, logits = model(images)
            loss = cfg.loss.classification_weight * cls_loss(logits.float(), labels)
            if metric_loss is not None:
                loss = loss + cfg.loss.metric_weight * metric_loss(emb, labels, scales=scales)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch} step {step}; the last good checkpoint "
                    f"is {out / 'checkpoints' / 'last.pt'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps, seen = total + loss.item(), steps + 1, seen + len(images)
        if scheduler is not None:
            scheduler.step()
        val = evaluate_split(cfg, model, gallery_loader, val_loader, device)
        score = val["knn"]["pooled"]["patient_accuracy"]
        record = {
            "epoch": epoch, "loss": total / max(steps, 1),
            "images_per_s": seen / (time.perf_counter() - t0),
            "val_patient_accuracy": score, "val_accuracy": val["knn"]["pooled"]["accuracy"],
            "val_head_accuracy": val["head"]["pooled"]["accuracy"],
        }  # fmt: skip
        with open(history, "a") as f:
            f.write(json.dumps(record) + "\n")
        save_checkpoint(out / "checkpoints" / "last.pt", model, optimizer, scheduler, epoch, best)
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            save_checkpoint(out / "checkpoints" / "best.pt", model, optimizer, scheduler, epoch,
                            best)  # fmt: skip
        else:
            stale += 1
            if cfg.optim.patience and stale >= cfg.optim.patience:
                break

    state = torch.load(out / "checkpoints" / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    test = evaluate_split(cfg, model, gallery_loader, _loader(cfg, dataset(splits.test, "eval"),
                                                               False), device)  # fmt: skip
    metrics = {"best_epoch": best_epoch, "best_val_patient_accuracy": best, "test": test,
               "splits": {k: int(getattr(splits, k).sum()) for k in ("train", "val", "test")},
               "data": splits.index.report}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
