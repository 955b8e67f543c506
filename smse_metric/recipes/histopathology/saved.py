"""The embeddings a run saves (``embeddings/*.npz``): written with the images' metadata
and data root, so that ``search`` and ``evaluate --data`` find the images again after the
data moved, and refuse another dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data.dataset import BreakHisDataset
from .errors import RecipeError
from .rundir import RunDir

__all__ = ["check_same_data", "relocated", "save_embeddings", "saved_root"]


def save_embeddings(path: Path, emb: torch.Tensor, ds: BreakHisDataset, root: Path) -> None:
    """Write ``emb`` with the metadata of the images of ``ds`` (absolute paths, sizes,
    patients, labels, classes and their names, magnifications) and the data ``root``;
    written to a temporary file and renamed, so a full disk never leaves a partial one.

    Args:
        path: the ``.npz`` to write.
        emb: [N, D] the embeddings of ``ds``'s images, in order.
        ds: the dataset they were computed from.
        root: the data directory ``ds`` was read from.

    Examples:
        Written by `save_evaluation` (skipped here: it needs a dataset):

        >>> save_embeddings(run.test_embeddings, ev.test_emb, ds.test, root)  # doctest: +SKIP
    """
    idx = ds.index.subset(ds.rows)
    tmp = path.with_name(path.stem + ".tmp.npz")
    try:
        np.savez(
            tmp,
            embeddings=emb.numpy().astype(np.float32),
            labels=ds.labels,
            subtypes=idx.subtype,
            binary=idx.label,
            subtype_names=np.array(idx.subtype_names, dtype=str),
            label_names=np.array(idx.label_names, dtype=str),
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


def check_same_data(run: RunDir, root: Path, recorded: Path) -> None:
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
        >>> run = RunDir(tempfile.mkdtemp())
        >>> old, new = (Path(tempfile.mkdtemp()) for _ in range(2))
        >>> run.embeddings.mkdir()
        >>> _ = (old / "a.png").write_bytes(b"12345")
        >>> np.savez(run.test_embeddings, paths=np.array([str(old / "a.png")]),
        ...          sizes=np.array([5]), root=np.array(str(old)))
        >>> _ = (new / "a.png").write_bytes(b"123")  # another image under the same name
        >>> try:
        ...     check_same_data(run, new, old)
        ... except RecipeError as e:
        ...     print("a.png is missing or changed" in str(e))
        True
    """
    for name, npz in (("test", run.test_embeddings), ("gallery", run.gallery_embeddings)):
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
