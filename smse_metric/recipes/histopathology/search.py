"""Similar cases for an image: embed it with a run's model, search the run's gallery.

The gallery is the run's kNN gallery (its training images, with their embeddings and
metadata in ``embeddings/gallery.npz``), searched exactly (FAISS or torch), so the
neighbours shown are the ones that vote in the run's kNN classification.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from smse_metric.evaluation import make_index

from .data.breakhis import SUBTYPES, TUMOR_CLASSES
from .data.dataset import eval_transform, normalize_image
from .data.images import read_image
from .data.manifest import data_folder
from .errors import RecipeError
from .evaluate import load_run
from .rundir import RunDir
from .saved import relocated, saved_root
from .splits import data_root

__all__ = ["Neighbour", "contact_sheet", "search_run"]


@dataclass(frozen=True)
class Neighbour:
    """One search result: a gallery image and its metadata.

    Attributes:
        rank: 1 for the nearest.
        distance: distance to the query (cosine: 1 - similarity; l2: euclidean).
        path: the gallery image file.
        patient: its patient (slide or case) id.
        label: its binary label's name (BreakHis: ``benign`` or ``malignant``).
        subtype: its class (BreakHis: the subtype code).
        magnification: its scale (BreakHis: 40, 100, 200 or 400).

    Examples:
        >>> n = Neighbour(1, 0.12, "a.png", "22549AB", "benign", "A", 40)
        >>> n.patient, n.magnification
        ('22549AB', 40)
    """

    rank: int
    distance: float
    path: str
    patient: str
    label: str
    subtype: str
    magnification: int


def search_run(
    run_dir: str | Path,
    image: str | Path,
    k: int = 5,
    device: str = "cpu",
    data: str | Path | None = None,
):
    """The ``k`` gallery images nearest to ``image`` under the run's best checkpoint.

    The query is resized and normalised as the run's evaluation images were (the
    ``data.mean`` / ``std`` / ``interpolation`` of its ``config.toml``). ``data``: where
    the run's dataset lies now, if it moved. Returns a list of `Neighbour`,
    nearest first.

    Args:
        run_dir: a trained run directory.
        image: the query image file.
        k: neighbours to return.
        device: where to embed the query.
        data: where the run's dataset lies now, if it moved.

    Examples:
        The five training images nearest to an image, under a finished run (skipped here:
        it needs a trained run; tests/recipes/histopathology/test_search.py runs it):

        >>> for n in search_run("runs/example", "query.png", k=5):  # doctest: +SKIP
        ...     print(n.rank, round(n.distance, 3), n.patient, n.subtype, n.magnification)
    """
    run = RunDir(run_dir)
    if not isinstance(k, int) or k < 1:
        raise RecipeError(f"k must be a positive integer, got {k!r}")
    for need in (run.config, run.best, run.gallery_embeddings):
        if not need.is_file():
            what = need.relative_to(run.path)
            raise RecipeError(f"{run} has no {what}: train (or evaluate) the run first")
    loaded = load_run(run, device)
    cfg, model = loaded.cfg, loaded.model
    try:
        img = read_image(image, cfg.data.max_image_pixels)
    except OSError as e:
        raise RecipeError(str(e)) from e
    x = eval_transform(tuple(cfg.data.image_size), cfg.data.interpolation)(img, None)
    x = normalize_image(x, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        emb, _ = model(x[None].to(device))
    with np.load(run.gallery_embeddings, allow_pickle=False) as meta:
        meta = {key: meta[key] for key in meta.files}
    index = make_index(meta["embeddings"], distance=cfg.eval.distance, device="cpu")
    dist, ids = index.search(emb.float().cpu(), min(k, index.ntotal))
    if data is not None:  # the dataset moved: same tree under a new root
        old = saved_root(run.gallery_embeddings, data_folder(data_root(cfg.data.path, run.path)))
        new = Path(os.path.abspath(data_folder(data)))
        try:
            meta["paths"] = np.array([str(relocated(p, old, new)) for p in meta["paths"]])
        except ValueError as e:
            raise RecipeError(
                f"the run's gallery paths do not lie under its data {old}; "
                f"re-run smse-metric evaluate --run {run} --data {new}"
            ) from e
    classes, binary, binary_names = _class_columns(meta)
    return [
        Neighbour(
            rank + 1,
            max(float(d), 0.0),  # 1 - cos rounds to -0.000 for a duplicate
            str(meta["paths"][i]),
            str(meta["groups"][i]),
            binary_names[int(binary[i])],
            classes[int(meta["subtypes"][i])],
            int(meta["magnifications"][i]),
        )
        for rank, (d, i) in enumerate(zip(dist[0], ids[0], strict=True))
        if i >= 0
    ]


def _class_columns(meta: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, list[str]]:
    """(class names, binary label per row, binary names) of a gallery file; one written
    before they were kept holds BreakHis's."""
    if "subtype_names" in meta:
        return (
            [str(c) for c in meta["subtype_names"]],
            meta["binary"],
            [str(c) for c in meta["label_names"]],
        )
    codes = list(SUBTYPES)
    malignant = np.array([SUBTYPES[c][0] == "M" for c in codes])
    return codes, malignant[meta["subtypes"]].astype(np.int64), list(TUMOR_CLASSES)


def contact_sheet(
    image: str | Path, neighbours: list[Neighbour], out: str | Path, thumb: int = 160
) -> Path:
    """A PNG row: the query, then each neighbour captioned with its metadata.

    Args:
        image: the query image file.
        neighbours: what `search_run` returned.
        out: the PNG to write; its directory must exist.
        thumb: tile size in pixels.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> from smse_metric.recipes.histopathology.search import Neighbour
        >>> paths = scan_breakhis(root).paths
        >>> found = [Neighbour(i + 1, 0.1 * i, paths[i], "p", "benign", "A", 40) for i in range(3)]
        >>> sheet = contact_sheet(paths[5], found, root / "sheet.png", thumb=64)
        >>> from PIL import Image; Image.open(sheet).size
        (256, 110)
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise RecipeError(f"cannot write the contact sheet {out}: {out.parent} does not exist")
    missing = [n.path for n in neighbours if not Path(n.path).is_file()]
    if missing:
        raise RecipeError(
            f"gallery image {missing[0]} is missing (did the data move? pass --data DIR)"
        )
    tiles = [(Path(image), "query")] + [
        (
            Path(n.path),
            f"#{n.rank} d={n.distance:.3f}\n{n.patient}\n{n.subtype} "
            f"{n.label[:3]} {n.magnification}x",
        )
        for n in neighbours
    ]
    caption = 46
    sheet = Image.new("RGB", (thumb * len(tiles), thumb + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for col, (path, text) in enumerate(tiles):
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (col * thumb + (thumb - im.width) // 2, (thumb - im.height) // 2))
        draw.multiline_text((col * thumb + 4, thumb + 2), text, fill="black", spacing=1)
    sheet.save(out)
    return out
