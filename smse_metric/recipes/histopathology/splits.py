"""Patient-disjoint train / validation / test splits of a BreakHis-layout directory."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .data import BreakHisIndex, load_folds, patient_split, scan_breakhis
from .data.folds import check_patient_disjoint
from .errors import RecipeError

__all__ = ["Splits", "data_root", "load_splits", "split_sizes"]


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
            raise RecipeError(f"data.folds_file {path} does not exist")
        return path
    for path in (root / "Folds.csv", root / f"dsfold{cfg.data.fold}.txt"):
        if path.is_file():
            return path
    return None


def load_splits(cfg: Config, root: str | Path, index: BreakHisIndex | None = None) -> Splits:
    """Scan ``root``, keep the configured magnifications, and split patients: the fold
    file's train/test (``data.folds_file``, ``root/Folds.csv`` or
    ``root/dsfold<fold>.txt``) or, without one, `patient_split`; validation
    patients are drawn from the training ones.

    Args:
        cfg: the run's validated `Config`.
        root: the BreakHis-layout data directory.
        index: ``root`` as scanned already (several folds of one scan), or None.

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
    if index is None:
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
            raise RecipeError(f"the {name} split is empty: too few patients for the fractions")
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
        msg = (
            f"validation needs at least {want_min} patients of each class and one left "
            f"to train on, but {'; '.join(short)} (lower data.min_val_patients_per_class "
            'or set data.small_validation = "warn")'
        )
        if cfg.data.small_validation == "error":
            raise RecipeError(msg)
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
    for name, mask in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        n, p = int(mask.sum()), len(np.unique(splits.index.group[mask]))
        parts.append(
            f"{name} {n} images / {p} patients" if name == "train" else f"{name} {n} / {p}"
        )
    return ", ".join(parts)


def data_root(path: str | None, run_dir: str | Path) -> Path:
    """The data a run trains on: ``data.path``, or ``RUN_DIR/data`` for synthetic runs.

    Args:
        path: ``data.path`` (None for synthetic data).
        run_dir: the run directory (synthetic data lives in ``run_dir/data``).

    Examples:
        >>> data_root(None, "runs/a").as_posix()
        'runs/a/data'
        >>> data_root("/data/BreaKHis", "runs/a").as_posix()
        '/data/BreaKHis'
    """
    return Path(path) if path else Path(run_dir) / "data"
