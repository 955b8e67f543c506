"""The run's data (a BreakHis directory or a manifest) and its patient-disjoint
train / validation / test splits."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config, DataConfig
from .data import BreakHisIndex, load_folds, patient_split, scan_breakhis
from .data.breakhis import SUBTYPES
from .data.folds import check_patient_disjoint
from .data.manifest import is_manifest, read_manifest
from .errors import RecipeError

__all__ = ["Splits", "data_root", "load_splits", "scan_data", "split_sizes"]

#: BreakHis's binary task: the malignant subtypes are label 1
MALIGNANT = [code for code, (cls, _) in SUBTYPES.items() if cls == "M"]


def scan_data(d: DataConfig, root: str | Path) -> BreakHisIndex:
    """The images of ``root`` (a BreakHis directory, or a manifest file) as the recipe's
    records, with the binary label of ``data.positive_classes``, checked against the
    config's ``classes`` and ``magnifications``.

    Args:
        d: the run's ``cfg.data``.
        root: a BreakHis-layout directory or a manifest (``.csv``; ``.parquet``).

    Raises:
        RecipeError: a bad manifest (one line naming the row and column), classes other
            than ``data.classes``, a ``data.magnifications`` value the data does not
            have, or no ``data.positive_classes`` for a binary task on a manifest of
            more than two classes.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology import load_config
        >>> from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> index = scan_data(load_config(overrides={"data": {"path": str(root)}}).data, root)
        >>> index.subtype_names[:2], sorted(set(index.magnification.tolist()))
        (('A', 'F'), [40, 100, 200, 400])
    """
    if is_manifest(root):
        index = read_manifest(root, d.columns, d.missing_files).index()
    else:
        if d.columns:
            raise RecipeError(
                f"data.columns names a manifest's columns, but the data {root} is a directory"
            )
        index = scan_breakhis(root, group_by=d.group_by)
    if d.classes and tuple(d.classes) != index.subtype_names:
        raise RecipeError(
            f"the data's classes ({', '.join(index.subtype_names)}) are not the run's "
            f"data.classes ({', '.join(d.classes)})"
        )
    index = index.with_positive(d.positive_classes or default_positive(index, d.task))
    missing = sorted(set(d.magnifications) - set(index.magnification.tolist()))
    if missing:
        have = ", ".join(str(m) for m in sorted(set(index.magnification.tolist())))
        raise RecipeError(
            f"data.magnifications: the data has no scale {missing[0]} (scales: {have})"
        )
    return index


def default_positive(index: BreakHisIndex, task: str) -> list[str]:
    """The classes of label 1 when ``data.positive_classes`` is empty: BreakHis's
    malignant subtypes, a two-class manifest's second class; none for the subtype task
    on other data.

    Args:
        index: the scanned data.
        task: ``data.task``.

    Examples:
        >>> idx = BreakHisIndex([], [], *(np.zeros(0, int) for _ in range(4)), [], "slide")
        >>> default_positive(idx, "binary")
        ['DC', 'LC', 'MC', 'PC']
    """
    if index.group_by in ("slide", "case"):
        return MALIGNANT
    if len(index.subtype_names) == 2:
        return [index.subtype_names[1]]
    if task == "binary":
        raise RecipeError(
            "data.positive_classes: the binary task needs the classes of label 1 "
            f"(the data's classes: {', '.join(index.subtype_names)})"
        )
    return []


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
    """Scan ``root`` (`scan_data`), keep the configured magnifications, and split
    patients: a manifest's ``split`` column (train / val / test) or ``fold`` column
    (``data.fold`` is the test fold), the fold file's train/test (``data.folds_file``,
    ``root/Folds.csv`` or ``root/dsfold<fold>.txt``) or, without any, `patient_split`;
    validation patients are drawn from the training ones unless the split column names
    them.

    Args:
        cfg: the run's validated `Config`.
        root: the data: a BreakHis-layout directory or a manifest.
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
        index = scan_data(cfg.data, root)
    mags = cfg.data.magnifications
    keep = np.isin(index.magnification, mags) if mags else np.ones(len(index), dtype=bool)
    folds = None if is_manifest(root) and not cfg.data.folds_file else _folds_file(cfg, Path(root))
    val = None
    if index.split is not None or index.fold is not None:
        index = index.subset(keep)
        train, val, test = _manifest_parts(cfg, index)
    elif folds is not None:  # fold files list every magnification: match, then restrict
        masks = index.masks(load_folds(folds, cfg.data.fold))
        index = index.subset(keep)
        train, test = masks["train"][keep], masks["test"][keep]
    else:
        index = index.subset(keep)
        split = patient_split(index, cfg.data.test_fraction, 0.0, seed=cfg.run.seed)
        train, test = split["train"], split["test"]
    if val is None or not val.any():
        val = _validation_patients(cfg, index, train)
    train = train & ~val
    for name, m in (("train", train), ("validation", val), ("test", test)):
        if not m.any():
            raise RecipeError(f"the {name} split is empty: too few patients for the fractions")
    check_patient_disjoint({"train": train, "val": val, "test": test}, index.group)
    return Splits(index, train, val, test)


def _manifest_parts(cfg: Config, index: BreakHisIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test masks from a manifest's split column, or from its fold
    column (fold ``data.fold`` is the test set, the others train); a group whose rows lie
    in two parts is an error naming it."""
    if index.split is not None:
        parts = {name: index.split == name for name in ("train", "val", "test")}
        column = "split"
    else:
        fold = np.asarray(index.fold)
        folds = sorted(set(fold.tolist()))
        if cfg.data.fold not in folds:
            raise RecipeError(
                f"data.fold = {cfg.data.fold}, but the manifest's fold column has "
                f"{', '.join(map(str, folds))}"
            )
        test = fold == cfg.data.fold
        parts = {"train": ~test, "val": np.zeros(len(index), dtype=bool), "test": test}
        column = "fold"
    owner: dict[int, str] = {}
    for name, mask in parts.items():
        for g in np.unique(index.group[mask]).tolist():
            if owner.setdefault(g, name) != name:
                raise RecipeError(
                    f"manifest {column} column: group {index.group_names[g]!r} has rows in "
                    f"{owner[g]!r} and {name!r} (a patient belongs to one part)"
                )
    return parts["train"], parts["val"], parts["test"]


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
