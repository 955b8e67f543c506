"""Evaluating a run: kNN (gallery: the training images) and head metrics of a split, and
everything a finished run writes from its best checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from smse_metric.evaluation import (
    FaissIndex,
    evaluate_embeddings,
    evaluate_predictions,
    make_index,
)

from .build import build_model, device_of, eval_loader, make_datasets, num_classes, resolve_inputs
from .config import Config, load_config
from .data.dataset import BreakHisDataset
from .engine import TrainState, embed, load_checkpoint
from .errors import RecipeError
from .models import EmbeddingNet
from .results import RunMetrics, SplitMetrics
from .splits import data_root, load_splits

__all__ = [
    "check_same_data",
    "evaluate_run",
    "evaluate_split",
    "relocated",
    "saved_root",
    "split_reports",
    "unreadable_images",
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
        >>> out = evaluate_split(cfg, build_model(cfg), ds["gallery"], ds["val"], cpu)
        >>> out.knn.k, out.head.pooled.n == len(ds["val"])
        (5, True)
    """
    g_emb, _ = embed(model, eval_loader(cfg, gallery), device, channels_last)
    q_emb, q_pred = embed(model, eval_loader(cfg, queries), device, channels_last)
    return split_reports(cfg, gallery, g_emb, queries, q_emb, q_pred)


def split_reports(
    cfg: Config,
    gallery: BreakHisDataset,
    gallery_emb: torch.Tensor,
    queries: BreakHisDataset,
    query_emb: torch.Tensor,
    query_pred: torch.Tensor,
) -> SplitMetrics:
    """The kNN report (queries against the gallery, as ``cfg.eval`` says) and the
    classifier head's report of one split.

    Args:
        cfg: the run's `Config`.
        gallery: the gallery images (labels, patients, magnifications).
        gallery_emb: [G, D] their embeddings.
        queries: the images scored.
        query_emb: [Q, D] their embeddings.
        query_pred: [Q] the head's predicted labels.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology import load_config
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> from smse_metric.recipes.histopathology.splits import load_splits
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> cfg = load_config(overrides={"data": {"path": str(root)}})
        >>> ds = make_datasets(cfg, load_splits(cfg, root))
        >>> g, q = ds["gallery"], ds["test"]
        >>> out = split_reports(cfg, g, torch.randn(len(g), 4), q, torch.randn(len(q), 4),
        ...                     torch.zeros(len(q), dtype=torch.long))
        >>> out.head.pooled.recall  # the head said "benign" for all
        [1.0, 0.0]
    """
    g, q = gallery, queries
    g_emb, q_emb, q_pred = gallery_emb, query_emb, query_pred
    knn = evaluate_embeddings(
        q_emb,
        q.labels,
        q.groups,
        q.scales,
        k=cfg.eval.k,
        exclude=cfg.eval.exclude,
        gallery=(g_emb, g.labels, g.groups, g.scales),
        metric=cfg.eval.metric,
        ranking=False,
    )
    head = evaluate_predictions(
        q_pred.numpy(), q.labels, q.groups, q.scales, classes=np.arange(num_classes(cfg))
    )
    return SplitMetrics(knn, head)


def unreadable_images(ds: dict[str, BreakHisDataset]) -> list[list[str]]:
    """``[path, reason]`` of every image the datasets left out as unreadable, once each.

    Args:
        ds: datasets by split name, as `make_datasets` returns them.

    Examples:
        >>> class Fake:
        ...     bad_images = [("a.png", "OSError: truncated")]
        >>> unreadable_images({"train": Fake(), "gallery": Fake()})
        [['a.png', 'OSError: truncated']]
    """
    seen, out = set(), []
    for d in ds.values():
        for path, why in d.bad_images:
            if path not in seen:
                seen.add(path)
                out.append([path, why])
    return out


def _save_embeddings(path: Path, emb: torch.Tensor, ds: BreakHisDataset, root: Path) -> None:
    """Written to a temporary file and renamed, so a full disk never leaves a partial one."""
    idx = ds.index.subset(ds.rows)
    tmp = path.with_name(path.stem + ".tmp.npz")
    try:
        np.savez(
            tmp,
            embeddings=emb.numpy().astype(np.float32),
            labels=ds.labels,
            subtypes=idx.subtype,
            groups=np.array([idx.group_names[g] for g in idx.group], dtype=str),
            magnifications=ds.scales,
            paths=np.array([os.path.abspath(p) for p in ds.paths], dtype=str),
            sizes=np.array([os.path.getsize(p) for p in ds.paths], dtype=np.int64),
            root=np.array(os.path.abspath(root)),
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def relocated(path: str | Path, old: Path, new: Path) -> Path:
    """``path``, which lies under the data root ``old``, under the root ``new`` (the data
    moved); a ValueError where it does not lie under ``old``.

    Args:
        path: an image file as an embeddings file records it.
        old: the root it was recorded under (`saved_root`).
        new: where the data lies now.

    Examples:
        >>> relocated("/data/a/b.png", Path("/data"), Path("/mnt/copy")).as_posix()
        '/mnt/copy/a/b.png'
    """
    return new / Path(os.path.abspath(path)).relative_to(os.path.abspath(old))


def saved_root(npz: str | Path, fallback: str | Path) -> Path:
    """The data root an ``embeddings/*.npz`` was written from (``fallback``, made
    absolute, for files written before the root was recorded).

    Args:
        npz: a run's ``embeddings/gallery.npz`` or ``test.npz``.
        fallback: the run's data directory as its ``config.toml`` names it.

    Examples:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "old.npz"
        >>> np.savez(f, paths=np.array(["/data/a.png"]))
        >>> saved_root(f, "/data").as_posix()
        '/data'
    """
    with np.load(npz, allow_pickle=False) as f:
        return Path(str(f["root"]) if "root" in f.files else os.path.abspath(fallback))


def check_same_data(run: Path, root: Path, recorded: Path) -> None:
    """Refuse ``root`` unless it holds the run's evaluated images under the same names
    and sizes as when they were embedded (a moved copy of the run's data passes; another
    dataset does not), before anything is written.

    Args:
        run: the run directory (its ``embeddings/{test,gallery}.npz``, if written).
        root: the data directory given now.
        recorded: the run's data directory as its ``config.toml`` names it.

    Raises:
        RecipeError: an image is missing under ``root`` or has another size.

    Examples:
        >>> import tempfile
        >>> run, old, new = (Path(tempfile.mkdtemp()) for _ in range(3))
        >>> (run / "embeddings").mkdir()
        >>> _ = (old / "a.png").write_bytes(b"12345")
        >>> np.savez(run / "embeddings" / "test.npz", paths=np.array([str(old / "a.png")]),
        ...          sizes=np.array([5]), root=np.array(str(old)))
        >>> _ = (new / "a.png").write_bytes(b"123")  # another image under the same name
        >>> try:
        ...     check_same_data(run, new, old)
        ... except RecipeError as e:
        ...     print("a.png is missing or changed" in str(e))
        True
    """
    for name in ("test", "gallery"):
        npz = run / "embeddings" / f"{name}.npz"
        if not npz.is_file():
            continue
        old = saved_root(npz, recorded)
        with np.load(npz, allow_pickle=False) as f:
            paths = f["paths"]
            sizes = f["sizes"] if "sizes" in f.files else None
        for i, p in enumerate(paths):
            try:
                new = relocated(str(p), old, root)
            except ValueError:
                new = root / Path(str(p)).name
            rel = new.relative_to(root)
            if not new.is_file() or (sizes is not None and new.stat().st_size != sizes[i]):
                raise RecipeError(
                    f"--data {root} does not hold the run's {name} images as they were "
                    f"({rel} is missing or changed): it is not the run's dataset, so its "
                    "results would be overwritten with another dataset's; train a new run "
                    "on it instead"
                )


def evaluate_run(
    run_dir: str | Path,
    root: str | Path | None = None,
    device: torch.device | str | None = None,
    cfg: Config | None = None,
    model: EmbeddingNet | None = None,
    bad_images: list | None = None,
) -> RunMetrics:
    """Evaluate a run's ``checkpoints/best.pt`` on its test patients and write
    ``metrics.json``, ``embeddings/{gallery,test}.npz`` (``gallery.npz`` is the kNN
    gallery that ``search`` queries), ``report.md`` with its plots and, where faiss is
    installed, ``index/gallery.faiss`` (the same gallery as a FAISS index).

    Args:
        run_dir: a run directory with ``config.toml`` and ``checkpoints/best.pt``.
        root: the data directory, if it moved since training (default: the config's).
        device: where to embed (default: the config's ``run.device``).
        cfg: the run's config, when the caller has it (default: ``config.toml``).
        model: a network to load ``best.pt`` into (default: built from the config).
        bad_images: unreadable images already found, to list in the report.

    Examples:
        Recompute a finished run's outputs (tests/recipes/histopathology/test_evaluate.py runs this;
        skipped here because it needs a trained run):

        >>> metrics = evaluate_run("runs/example")  # doctest: +SKIP
        >>> metrics.test.knn.pooled.patient_accuracy  # doctest: +SKIP
        0.8...
    """
    from .rundir import lock_run_dir

    out = Path(run_dir)
    if not (out / "config.toml").is_file():
        raise RecipeError(f"{out} has no config.toml: it is not a run directory")
    with lock_run_dir(out):
        return _evaluate_run(out, root, device, cfg, model, bad_images)


def _evaluate_run(out, root, device, cfg, model, bad_images) -> RunMetrics:
    from .report import write_report

    cfg = resolve_inputs(load_config(out / "config.toml")) if cfg is None else cfg
    recorded = Path(os.path.abspath(data_root(cfg, out)))
    root = recorded if root is None else Path(os.path.abspath(root))
    if not root.is_dir():
        raise RecipeError(f"the run's data {root} does not exist (moved? pass --data DIR)")
    if root != recorded:
        check_same_data(out, root, recorded)
    device = device_of(cfg) if device is None else torch.device(device)
    splits = load_splits(cfg, root)
    ds = make_datasets(cfg, splits, collective=False)  # rank 0 alone, under DDP
    model = build_model(cfg) if model is None else model
    state = load_checkpoint(out / "checkpoints" / "best.pt", device)
    model.load_state_dict(state["model"])
    model.to(device)
    channels_last = device.type == "cuda"
    g_emb, _ = embed(model, eval_loader(cfg, ds["gallery"]), device, channels_last)
    q_emb, q_pred = embed(model, eval_loader(cfg, ds["test"]), device, channels_last)
    test = split_reports(cfg, ds["gallery"], g_emb, ds["test"], q_emb, q_pred)
    train_state = TrainState.from_checkpoint(state)
    metrics = RunMetrics(
        best_epoch=train_state.best_epoch,
        selected_on=f"validation {cfg.eval.select} patient accuracy",
        best_val_score=train_state.best,
        test=test,
        splits={k: int(getattr(splits, k).sum()) for k in ("train", "val", "test")},
        data=splits.index.report,
        bad_images=unreadable_images(ds) if bad_images is None else bad_images,
    )
    (out / "embeddings").mkdir(exist_ok=True)
    _save_embeddings(out / "embeddings" / "gallery.npz", g_emb, ds["gallery"], root)
    _save_embeddings(out / "embeddings" / "test.npz", q_emb, ds["test"], root)
    index = make_index(g_emb, metric=cfg.eval.metric, device="cpu")
    if isinstance(index, FaissIndex):  # for FAISS users; search itself reads gallery.npz
        (out / "index").mkdir(exist_ok=True)
        index.save(out / "index" / "gallery.faiss")
    metrics.save(out / "metrics.json")
    write_report(out)
    return metrics
