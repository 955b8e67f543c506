"""BreakHis fold files (the official ``dsfold<k>.txt``, Kaggle's ``Folds.csv``) and
patient-disjoint splits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import RecipeError
from .breakhis import BreakHisIndex

__all__ = ["check_patient_disjoint", "load_folds", "patient_split"]


def load_folds(path: str | Path, fold: int) -> dict[str, set[str]]:
    """Read one fold of an official ``dsfold<k>.txt`` or a Kaggle ``Folds.csv``.

    ``dsfold<k>.txt`` rows are ``<filename>|<mag>|<fold>|<grp>``; ``Folds.csv`` has
    the columns ``fold,mag,grp,filename``. Returns ``{"train": {...}, "test": {...}}``
    of file base names (use `BreakHisIndex.masks` to select rows).

    Args:
        path: a ``Folds.csv`` (Kaggle) or ``dsfold<k>.txt`` (official kit) file.
        fold: the fold to read, from 1.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> index = scan_breakhis(root)
        >>> split = load_folds(root / "Folds.csv", fold=1)
        >>> masks = index.masks(split)
        >>> bool((masks["train"] ^ masks["test"]).all())  # every image in exactly one part
        True
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"fold file {path} does not exist")
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 1:
        raise RecipeError(f"fold must be a positive integer, got {fold!r}")
    split: dict[str, set[str]] = {}
    with open(path, newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            need = {"fold", "mag", "grp", "filename"}
            if not need <= set(reader.fieldnames or ()):
                raise RecipeError(
                    f"{path} lacks columns {sorted(need - set(reader.fieldnames or ()))}"
                )
            rows = ((r["filename"], r["fold"], r["grp"]) for r in reader)
        else:
            rows = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().split("|")
                if len(parts) != 4:
                    raise RecipeError(f"{path}:{n}: expected <filename>|<mag>|<fold>|<grp>")
                rows.append((parts[0], parts[2], parts[3]))
        for name, fold_id, grp in rows:
            if int(fold_id) == fold:
                split.setdefault(grp.strip().lower(), set()).add(Path(name).name)
    if not split:
        raise RecipeError(f"{path} has no rows for fold {fold}")
    return split


def patient_split(
    index: BreakHisIndex,
    test_fraction: float = 0.3,
    val_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, np.ndarray]:
    """Patient-disjoint train / val / test masks when no fold file exists.

    Groups (patients) are shuffled with ``default_rng(seed)`` and assigned whole; with
    ``stratify`` this is done per subtype, so each split has every subtype that has
    enough patients, and every subtype keeps at least one training patient.

    Args:
        index: the scanned images (`BreakHisIndex`).
        test_fraction: share of each stratum's patients put in test, in [0, 1).
        val_fraction: share put in validation, in [0, 1).
        seed: seed of ``numpy.random.default_rng`` for the shuffle.
        stratify: split each subtype's patients apart (else all patients together).

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> index = scan_breakhis(root)
        >>> split = patient_split(index, test_fraction=0.3, val_fraction=0.1, seed=0)
        >>> check_patient_disjoint(split, index.group)  # raises if a patient were shared
        >>> sorted(split)
        ['test', 'train', 'val']
    """
    for name, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 <= v < 1:
            raise RecipeError(f"{name} must be in [0, 1), got {v}")
    if test_fraction + val_fraction >= 1:
        raise RecipeError("test_fraction + val_fraction must be below 1")
    rng = np.random.default_rng(seed)
    n_groups = int(index.group.max()) + 1
    group_stratum = np.zeros(n_groups, dtype=np.int64)
    if stratify:
        group_stratum[index.group] = index.subtype
    assign = np.zeros(n_groups, dtype=np.int64)  # 0 train, 1 val, 2 test
    present = np.zeros(n_groups, dtype=bool)
    present[index.group] = True
    for stratum in np.unique(group_stratum[present]):
        members = np.flatnonzero(present & (group_stratum == stratum))
        members = members[rng.permutation(len(members))]
        # every stratum keeps at least one training patient
        n_test = min(round(test_fraction * len(members)), len(members) - 1)
        n_val = min(round(val_fraction * len(members)), len(members) - 1 - n_test)
        assign[members[:n_test]] = 2
        assign[members[n_test : n_test + n_val]] = 1
    part = assign[index.group]
    masks = {"train": part == 0, "val": part == 1, "test": part == 2}
    check_patient_disjoint(masks, index.group)
    return masks


def check_patient_disjoint(masks: dict[str, np.ndarray], groups: np.ndarray) -> None:
    """Raise ValueError naming a patient that appears in two splits.

    Args:
        masks: split name -> boolean mask over the images.
        groups: [N] patient id of each image.

    Examples:
        >>> import numpy as np
        >>> groups = np.array([0, 0, 1, 2])
        >>> check_patient_disjoint({"train": np.array([1, 1, 0, 0], bool),
        ...                         "test": np.array([0, 0, 1, 1], bool)}, groups)
        >>> try:
        ...     check_patient_disjoint({"train": np.array([1, 0, 0, 0], bool),
        ...                             "test": np.array([0, 1, 1, 1], bool)}, groups)
        ... except ValueError as e:
        ...     print(e)
        patient 0 is in both 'train' and 'test'
    """
    owner: dict[int, str] = {}
    for name, m in masks.items():
        for gid in np.unique(np.asarray(groups)[m]).tolist():
            if gid in owner:
                raise RecipeError(f"patient {gid!r} is in both {owner[gid]!r} and {name!r}")
            owner[gid] = name
