"""Evaluating a run: kNN (gallery: the training images) and head metrics of a split, and
everything a finished run writes from its best checkpoint."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from smse_metric.distributed import get_world_size
from smse_metric.evaluation import (
    FaissIndex,
    evaluate_embeddings,
    evaluate_predictions,
    make_index,
)
from smse_metric.evaluation.sharded import gather_arrays, gather_objects

from .build import build_model, device_of, num_classes, resolve_inputs
from .checkpoint import TrainState, load_checkpoint
from .config import Config, load_config
from .data.dataset import BreakHisDataset
from .data.manifest import data_folder
from .errors import RecipeError
from .loaders import Datasets, eval_loader, eval_rows, make_datasets
from .lock import lock_run_dir
from .models import EmbeddingNet
from .report import read_history, write_report
from .results import RunMetrics, SplitMetrics
from .rundir import RunDir
from .saved import check_same_data, save_embeddings
from .splits import Splits, data_root, load_splits

__all__ = [
    "Evaluation",
    "LoadedRun",
    "embed",
    "evaluate_model",
    "evaluate_run",
    "evaluate_split",
    "load_run",
    "save_evaluation",
    "split_reports",
]


def evaluate_split(
    cfg: Config,
    model: EmbeddingNet,
    gallery: BreakHisDataset,
    queries: BreakHisDataset,
    device: torch.device,
    channels_last: bool = False,
) -> SplitMetrics:
    """kNN (gallery: training images) and head metrics of one split.

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
        >>> ds = make_datasets(cfg, s)
        >>> cpu = torch.device("cpu")
        >>> out = evaluate_split(cfg, build_model(cfg), ds.gallery, ds.val, cpu)
        >>> out.knn.k, out.head.pooled.n == len(ds.val)
        (5, True)
    """
    rows = (eval_rows(len(gallery)), eval_rows(len(queries))) if get_world_size() > 1 else None
    workers = cfg.data.num_workers
    g_rows, q_rows = rows or (None, None)
    g_emb, _ = embed(model, eval_loader(gallery, workers, g_rows), device, channels_last)
    q_emb, q_pred = embed(model, eval_loader(queries, workers, q_rows), device, channels_last)
    return split_reports(cfg, gallery, g_emb, queries, q_emb, q_pred, rows)


def split_reports(
    cfg: Config,
    gallery: BreakHisDataset,
    gallery_emb: torch.Tensor,
    queries: BreakHisDataset,
    query_emb: torch.Tensor,
    query_pred: torch.Tensor,
    rows: tuple[slice, slice] | None = None,
) -> SplitMetrics:
    """The kNN report (queries against the gallery, as ``cfg.eval`` says) and the
    classifier head's report of one split. The search is the torch one, whose
    arithmetic the ranks of a ``torchrun`` run share: under one, each rank passes the
    embeddings of its ``rows`` of the gallery and the queries (`eval_rows`) and every
    rank gets the reports of the whole split.

    Args:
        cfg: the run's `Config`.
        gallery: the gallery images (labels, patients, magnifications).
        gallery_emb: [G, D] their embeddings.
        queries: the images scored.
        query_emb: [Q, D] their embeddings.
        query_pred: [Q] the head's predicted labels.
        rows: under ``torchrun``, this rank's (gallery rows, query rows); None: all.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology import load_config
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> from smse_metric.recipes.histopathology.splits import load_splits
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> cfg = load_config(overrides={"data": {"path": str(root)}})
        >>> ds = make_datasets(cfg, load_splits(cfg, root))
        >>> g, q = ds.gallery, ds.test
        >>> out = split_reports(cfg, g, torch.randn(len(g), 4), q, torch.randn(len(q), 4),
        ...                     torch.zeros(len(q), dtype=torch.long))
        >>> out.head.pooled.recall  # the head said "benign" for all
        [1.0, 0.0]
    """
    g, q = gallery, queries
    gr, qr = rows or (slice(None), slice(None))
    knn = evaluate_embeddings(
        query_emb,
        q.labels[qr],
        q.groups[qr],
        q.scales[qr],
        k=cfg.eval.k,
        exclude=cfg.eval.exclude,
        gallery=(gallery_emb, g.labels[gr], g.groups[gr], g.scales[gr]),
        distance=cfg.eval.distance,
        ranking=False,
        backend="torch",
        distributed=rows is not None,
    )
    pred = query_pred.numpy()
    if rows is not None:  # the head's predictions of every rank, in order
        pred = gather_arrays(pred)
    head = evaluate_predictions(
        pred, q.labels, q.groups, q.scales, classes=np.arange(num_classes(cfg.data))
    )
    return SplitMetrics(knn, head)


@dataclasses.dataclass
class Evaluation:
    """The test split scored by a model: its reports and the embeddings behind them.

    Attributes:
        test: kNN and head reports of the test split.
        gallery_emb: [G, D] the kNN gallery's embeddings (the training images).
        test_emb: [Q, D] the test images' embeddings.

    Examples:
        >>> [f.name for f in dataclasses.fields(Evaluation)]
        ['test', 'gallery_emb', 'test_emb']
    """

    test: SplitMetrics
    gallery_emb: torch.Tensor
    test_emb: torch.Tensor

    def test_points(self, test: BreakHisDataset) -> dict[str, np.ndarray]:
        """The test images as the report's projection plots them."""
        return {
            "embeddings": self.test_emb.numpy(),
            "labels": test.labels,
            "magnifications": test.scales,
        }


def evaluate_model(
    cfg: Config,
    model: EmbeddingNet,
    gallery: BreakHisDataset,
    test: BreakHisDataset,
    device: torch.device,
) -> Evaluation:
    """Score ``test`` with ``model``: kNN over ``gallery`` and the head; nothing is
    written (the core step that training and the ``evaluate`` command share).

    Args:
        cfg: the run's `Config`.
        model: the network with the weights to score.
        gallery: the kNN gallery (the training images, evaluation transform).
        test: the test images.
        device: where to embed.

    Examples:
        The step training and ``evaluate`` share (skipped here: it needs a trained model):

        >>> ev = evaluate_model(cfg, model, ds.gallery, ds.test, device)  # doctest: +SKIP
        >>> ev.test.knn.pooled.patient_accuracy  # doctest: +SKIP
        0.8...
    """
    channels_last = device.type == "cuda"
    rows = (eval_rows(len(gallery)), eval_rows(len(test))) if get_world_size() > 1 else None
    workers = cfg.data.num_workers
    g_rows, q_rows = rows or (None, None)
    g_emb, _ = embed(model, eval_loader(gallery, workers, g_rows), device, channels_last)
    q_emb, q_pred = embed(model, eval_loader(test, workers, q_rows), device, channels_last)
    reports = split_reports(cfg, gallery, g_emb, test, q_emb, q_pred, rows)
    if rows is not None:  # the saved embeddings: every rank's, in dataset order
        g_emb, q_emb = _gather_rows(g_emb), _gather_rows(q_emb)
    return Evaluation(reports, g_emb, q_emb)


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` [n, D], in rank order (a rank without rows has none)."""
    parts = [p for p in gather_objects(t.numpy()) if len(p)]
    return torch.from_numpy(np.concatenate(parts))


def run_metrics(
    select: str, ev: Evaluation, state: TrainState, splits: Splits, bad_images: list, task: str
) -> RunMetrics:
    """The run's `RunMetrics`: the test reports and how they were obtained (``select``:
    ``eval.select``, the predictor the best epoch was selected on; the data report names
    the ``task``'s classes)."""
    index = splits.index
    names = index.label_names if task == "binary" else index.subtype_names
    return RunMetrics(
        best_epoch=state.best_epoch,
        selected_on=f"validation {select} patient accuracy",
        best_val_score=state.best,
        test=ev.test,
        splits={k: int(getattr(splits, k).sum()) for k in ("train", "val", "test")},
        data={**index.report, "class_names": list(names)},
        bad_images=bad_images,
    )


def save_evaluation(
    run: RunDir,
    metrics: RunMetrics,
    ev: Evaluation,
    datasets: Datasets,
    root: Path,
    distance: str,
) -> None:
    """Write ``metrics.json``, ``embeddings/{gallery,test}.npz`` (``gallery.npz`` is the
    kNN gallery that ``search`` queries) and, where faiss is installed,
    ``index/gallery.faiss`` (the same gallery as a FAISS index).

    Args:
        run: the run directory.
        metrics: what `run_metrics` gave.
        ev: what `evaluate_model` gave.
        datasets: the gallery and test datasets it scored.
        root: the data directory they were read from.
        distance: the kNN distance (``eval.distance``).

    Examples:
        After `evaluate_model` (skipped here: it needs a trained run):

        >>> save_evaluation(run, metrics, ev, ds, root, cfg.eval.distance)  # doctest: +SKIP
        >>> run.gallery_embeddings.is_file()  # doctest: +SKIP
        True
    """
    run.embeddings.mkdir(exist_ok=True)
    save_embeddings(run.gallery_embeddings, ev.gallery_emb, datasets.gallery, root)
    save_embeddings(run.test_embeddings, ev.test_emb, datasets.test, root)
    index = make_index(ev.gallery_emb, distance=distance, device="cpu")
    if isinstance(index, FaissIndex):  # for FAISS users; search itself reads gallery.npz
        run.index.parent.mkdir(exist_ok=True)
        index.save(run.index)
    metrics.save(run.metrics)


@dataclasses.dataclass
class LoadedRun:
    """A finished run read back: its config (inputs resolved), its network with the
    selected weights, and the training state saved beside them.

    Attributes:
        cfg: the run's `Config`.
        model: the network with ``best.pt``'s weights, on the device asked for, in eval mode.
        state: the `TrainState` saved with ``best.pt``.

    Examples:
        >>> [f.name for f in dataclasses.fields(LoadedRun)]
        ['cfg', 'model', 'state']
    """

    cfg: Config
    model: EmbeddingNet
    state: TrainState


def load_run(run: RunDir, device: torch.device | str | None = None) -> LoadedRun:
    """Load a run's ``config.toml`` and ``checkpoints/best.pt``: the network is built once
    and its backbone's data config fills the config's empty input keys.

    Args:
        run: the run directory.
        device: where to put the network (default: the config's ``run.device``).

    Examples:
        >>> import tempfile
        >>> try:
        ...     load_run(RunDir(tempfile.mkdtemp()))
        ... except RecipeError as e:
        ...     print("no config.toml" in str(e))
        True
    """
    for need in (run.config, run.best):
        if not need.is_file():
            raise RecipeError(f"{run} has no {need.relative_to(run.path)}: train the run first")
    cfg = load_config(run.config)
    model = build_model(cfg)
    cfg = resolve_inputs(cfg, model)
    device = device_of(cfg.run.device) if device is None else torch.device(device)
    state = load_checkpoint(run.best, device)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return LoadedRun(cfg, model, TrainState.from_checkpoint(state))


def evaluate_run(
    run_dir: str | Path,
    root: str | Path | None = None,
    device: torch.device | str | None = None,
) -> RunMetrics:
    """The ``evaluate`` command: load a run (`load_run`), score its best checkpoint on
    its test patients (`evaluate_model`), write what `save_evaluation` writes and render
    ``report.md`` from the result.

    Args:
        run_dir: a run directory with ``config.toml`` and ``checkpoints/best.pt``.
        root: the data directory, if it moved since training (default: the config's).
        device: where to embed (default: the config's ``run.device``).

    Examples:
        Recompute a finished run's outputs (tests/recipes/histopathology/test_evaluate.py
        runs this; skipped here because it needs a trained run):

        >>> metrics = evaluate_run("runs/example")  # doctest: +SKIP
        >>> metrics.test.knn.pooled.patient_accuracy  # doctest: +SKIP
        0.8...
    """
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise RecipeError(f"{run} has no config.toml: it is not a run directory")
    with lock_run_dir(run.path):
        loaded = load_run(run, device)
        cfg = loaded.cfg
        recorded = Path(os.path.abspath(data_root(cfg.data.path, run.path)))
        root = recorded if root is None else Path(os.path.abspath(root))
        if not root.exists():
            raise RecipeError(f"the run's data {root} does not exist (moved? pass --data DIR)")
        if root != recorded:
            check_same_data(run, data_folder(root), data_folder(recorded))
        splits = load_splits(cfg, root)
        ds = make_datasets(
            cfg, splits, names=("gallery", "test"), collective=False, model=loaded.model
        )
        device = next(loaded.model.parameters()).device
        ev = evaluate_model(cfg, loaded.model, ds.gallery, ds.test, device)
        metrics = run_metrics(
            cfg.eval.select, ev, loaded.state, splits, ds.bad_images(), cfg.data.task
        )
        save_evaluation(run, metrics, ev, ds, data_folder(root), cfg.eval.distance)
        write_report(run, metrics, read_history(run.history), ev.test_points(ds.test))
        return metrics


@torch.no_grad()
def embed(
    model: nn.Module, loader: Iterable, device: torch.device, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """Embeddings [N, D] (float32, CPU) and head predictions [N] of a loader, in order.

    Args:
        model: a network returning ``(embeddings, logits)``.
        loader: batches whose first item is the images.
        device: where to run the network.
        channels_last: feed images in channels-last memory format.

    Examples:
        >>> from smse_metric.recipes.histopathology.models import EmbeddingNet
        >>> data = torch.utils.data.TensorDataset(torch.randn(5, 3, 16, 16))
        >>> emb, pred = embed(EmbeddingNet(embedding_dim=8), torch.utils.data.DataLoader(data),
        ...                   torch.device("cpu"))
        >>> emb.shape, pred.shape
        (torch.Size([5, 8]), torch.Size([5]))
    """
    model.eval()
    embs, preds = [], []
    for images, *_ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last and images.ndim == 4:  # not cached features [B, F]
            images = images.contiguous(memory_format=torch.channels_last)
        emb, logits = model(images)
        embs.append(emb.float().cpu())
        preds.append(logits.argmax(1).cpu())
    if not embs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(embs), torch.cat(preds)
