"""The case archive from runs (``smse-metric archive``): embed a dataset's images with a
run's best checkpoint into an `EmbeddingStore`, index it, search it by case, evaluate it.

A run's model is named by its backbone and a digest of its weights, so an archive only
ever holds one model's vectors; an image is keyed by the digest of its file's bytes, so
adding a file twice (under any name) adds it once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from smse_metric.archive import AddResult, ArchiveIndex, CaseSearch, EmbeddingStore, search_cases

from .data.dataset import BreakHisDataset, eval_transform, normalize_image
from .data.features import module_digest
from .data.images import read_image
from .data.rowfile import file_digest
from .errors import RecipeError
from .evaluate import LoadedRun, embed, load_run
from .loaders import eval_loader
from .rundir import RunDir
from .splits import scan_data

__all__ = ["ArchiveAdd", "add_run_images", "index_path", "model_name", "search_archive"]


def model_name(loaded: LoadedRun) -> str:
    """``backbone@digest``: what an archive records as the model of its vectors.

    Args:
        loaded: a run read back by `load_run`.

    Examples:
        >>> from types import SimpleNamespace
        >>> from smse_metric.recipes.histopathology.models import EmbeddingNet
        >>> cfg = SimpleNamespace(model=SimpleNamespace(backbone="smse-cnn"))
        >>> model_name(SimpleNamespace(cfg=cfg, model=EmbeddingNet(embedding_dim=8)))[:9]
        'smse-cnn@'
    """
    return f"{loaded.cfg.model.backbone}@{module_digest(loaded.model)}"


def index_path(archive: str | Path, kind: str) -> Path:
    """Where ``smse-metric archive index`` keeps an index of ``kind`` in the archive.

    Args:
        archive: the archive directory.
        kind: the index kind.

    Examples:
        >>> index_path("arch", "hnsw").name
        'index-hnsw.faiss'
    """
    return Path(archive) / f"index-{kind}.faiss"


@dataclass(frozen=True)
class ArchiveAdd:
    """What `add_run_images` did.

    Attributes:
        result: the store's `AddResult` (rows added, duplicates skipped).
        bad_images: unreadable images left out, with the reason.
        model: the model the vectors came from.

    Examples:
        >>> ArchiveAdd(AddResult(3, 1, 0), [], "smse-cnn@ab").result.duplicates
        1
    """

    result: AddResult
    bad_images: list[tuple[str, str]]
    model: str


def add_run_images(
    archive: str | Path,
    run_dir: str | Path,
    data: str | Path,
    device: str | None = None,
    dtype: str = "float16",
) -> ArchiveAdd:
    """Embed every image of ``data`` (a BreakHis directory or a manifest) with the run's
    best checkpoint and append them to ``archive`` (made on first use): case = the
    image's patient (group), label = its class, scale = its magnification.

    Args:
        archive: the archive directory (new, empty, or an archive of the same model).
        run_dir: a trained run.
        data: the images to add.
        device: where to embed (default: the run's ``run.device``).
        dtype: the vectors on disk for a new archive (``"float16"`` or ``"float32"``).

    Examples:
        Two adds of the same data add it once (tests/recipes/histopathology/
        test_archive.py runs this; skipped here because it needs a trained run):

        >>> add_run_images("archive", "runs/example", "data/").result.added  # doctest: +SKIP
        1992
    """
    run = RunDir(run_dir)
    loaded = load_run(run, device)
    cfg, name = loaded.cfg, model_name(loaded)
    archive = Path(archive)
    store = _open_or_create(archive, name, dtype)
    index = scan_data(cfg.data, data)
    d = cfg.data
    ds = BreakHisDataset(
        index, "eval", size=tuple(d.image_size), task="subtype", skip_bad_images=True,
        mean=d.mean, std=d.std, interpolation=d.interpolation or "bilinear",
        max_image_pixels=d.max_image_pixels,
    )  # fmt: skip
    if store is not None and store.model != name:  # before the embedding, not after it
        raise RecipeError(
            f"the run's model {name} did not embed the archive {archive} ({store.model}): "
            "vectors of different models are never mixed; start a new archive"
        )
    device_ = next(loaded.model.parameters()).device
    emb, _ = embed(loaded.model, eval_loader(ds, d.num_workers), device_)
    rows = ds.rows
    paths = [os.path.abspath(index.paths[r]) for r in rows]
    if store is None:
        store = EmbeddingStore.create(archive, dim=emb.shape[1], model=name, dtype=dtype)
    result = store.add(
        emb,
        cases=[index.group_names[g] for g in ds.groups],
        sources=paths,
        labels=[index.subtype_names[s] for s in ds.labels],
        scales=ds.scales,
        keys=[file_digest(p) for p in paths],
        model=name,
    )
    return ArchiveAdd(result, ds.bad_images, name)


def _open_or_create(archive: Path, model: str, dtype: str) -> EmbeddingStore | None:
    """The archive if one is there; None if ``archive`` is new or empty; an error for
    anything else (a directory the project did not make is never written into)."""
    if (archive / "archive.json").is_file():
        return EmbeddingStore(archive)
    if archive.exists() and (not archive.is_dir() or any(archive.iterdir())):
        raise RecipeError(f"{archive} exists and is not an archive: give a new or empty directory")
    if dtype not in ("float16", "float32"):
        raise RecipeError(f"--dtype must be float16 or float32, got {dtype!r}")
    return None


def search_archive(
    archive: str | Path,
    run_dir: str | Path,
    images: list[str | Path],
    kind: str | None = None,
    k: int = 10,
    cases: int = 5,
    exclude_case: str | None = None,
    scales: str = "any",
    device: str | None = None,
) -> CaseSearch:
    """The archive's cases most like ``images`` (one case's images), embedded with the
    run that built the archive.

    Args:
        archive: the archive directory.
        run_dir: the run whose model embedded the archive.
        images: query image files.
        kind: the index to search (its file from ``smse-metric archive index``); None:
            the only one built, or exact search when none is.
        k: archive patches per query image.
        cases: cases to return.
        exclude_case: leave this case out (the query's own, when it is in the archive).
        scales: ``"any"``, ``"same"`` or ``"other"`` magnification as each image's
            (its scale read from a BreakHis file name; else ``"any"`` only).
        device: where to embed the queries.

    Examples:
        >>> search_archive("archive", "runs/example", ["q.png"]).suggested  # doctest: +SKIP
        'DC'
    """
    store = open_store(archive)
    loaded = load_run(RunDir(run_dir), device)
    name = model_name(loaded)
    if name != store.model:
        raise RecipeError(
            f"the run's model {name} did not embed the archive {archive} ({store.model}): "
            "search it with the run that built it"
        )
    device_ = next(loaded.model.parameters()).device
    index = open_index(store, archive, kind, device_.type)  # exact searches there too
    cfg = loaded.cfg
    transform = eval_transform(tuple(cfg.data.image_size), cfg.data.interpolation)
    batch, query_scales = [], []
    for path in images:
        try:
            img = read_image(path, cfg.data.max_image_pixels)
        except OSError as e:
            raise RecipeError(str(e)) from e
        batch.append(normalize_image(transform(img, None), cfg.data.mean, cfg.data.std))
        query_scales.append(_scale_of(path))
    with torch.no_grad():
        emb, _ = loaded.model(torch.stack(batch).to(device_))
    if scales != "any" and None in query_scales:
        raise RecipeError(
            f"--scales {scales} needs each query's magnification; "
            f"{images[query_scales.index(None)]} is not a BreakHis file name"
        )
    return search_cases(
        index, emb.float().cpu().numpy(), k=k, cases=cases, exclude_case=exclude_case,
        query_scales=None if scales == "any" else query_scales, scales=scales,
    )  # fmt: skip


def _scale_of(path: str | Path) -> int | None:
    from .data.breakhis import parse_breakhis_filename

    try:
        return parse_breakhis_filename(Path(path).name).magnification
    except ValueError:
        return None


def open_store(archive: str | Path) -> EmbeddingStore:
    """The archive in ``archive``, or a RecipeError in one line."""
    try:
        return EmbeddingStore(archive)
    except ValueError as e:
        raise RecipeError(str(e)) from e


def open_index(
    store: EmbeddingStore, archive: str | Path, kind: str | None, device: str = "cpu"
) -> ArchiveIndex:
    """The archive's index of ``kind`` (or its only one; exact search when none), its
    exact searches on ``device``."""
    built = sorted(Path(archive).glob("index-*.faiss.json"))
    kinds = [p.name[len("index-") : -len(".faiss.json")] for p in built]
    if kind is None:
        if len(kinds) > 1:
            raise RecipeError(f"{archive} has indexes {', '.join(kinds)}: choose one with --index")
        kind = kinds[0] if kinds else "exact"
    try:
        if kind == "exact" and "exact" not in kinds:
            return ArchiveIndex.build(store, "exact", device=device)
        index = ArchiveIndex.load(store, index_path(archive, kind), device)
    except ValueError as e:
        raise RecipeError(f"{e} (smse-metric archive index {archive} --kind {kind})") from e
    if index.pending:  # rows added since the build: indexed now, not lost
        index.add_new()
    return index
