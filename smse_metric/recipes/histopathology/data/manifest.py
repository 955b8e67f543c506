"""Datasets from a manifest: one row per image with its file, class, group (patient,
slide or case) and scale (magnification or any acquisition condition), and optionally a
split or a fold. CSV always; Parquet where pyarrow is installed.

A bad manifest is one line that names the file, the line and the column; rows left out
(``missing_files="skip"``) are counted and listed, never dropped silently. A BreakHis
tree is one source of such records: `write_manifest` writes its index as a manifest.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from .breakhis import BreakHisIndex

__all__ = [
    "COLUMNS",
    "OPTIONAL_COLUMNS",
    "SPLIT_VALUES",
    "Manifest",
    "data_folder",
    "is_manifest",
    "read_manifest",
    "write_manifest",
]

#: the columns every manifest has (under these names or mapped by ``columns=``)
COLUMNS = ("path", "label", "group", "scale")
#: the columns a manifest may have: a fixed split or cross-validation folds
OPTIONAL_COLUMNS = ("split", "fold")
#: the binary task's label names on a manifest (label 1: ``data.positive_classes``)
BINARY_NAMES = ("negative", "positive")
#: the values of an optional ``split`` column
SPLIT_VALUES = ("train", "val", "test")


@dataclass
class Manifest:
    """A manifest's rows, checked: one entry per kept row (numpy arrays of length N).

    Attributes:
        source: the manifest file.
        paths: absolute image paths (a relative ``path`` is relative to the manifest).
        label: [N] class index into ``class_names``.
        group: [N] index into ``group_names``.
        scale: [N] index into ``scale_names``.
        class_names: the classes, sorted.
        group_names: the groups, sorted.
        scale_names: the scales, in numeric order where all are numbers, else sorted.
        split: [N] ``"train"`` / ``"val"`` / ``"test"``, or None without a split column.
        fold: [N] fold number (from 1), or None without a fold column.
        lines: [N] the manifest line of each row (the header is line 1).
        skipped: ``(line, reason)`` of every row left out.

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for name in ("a.png", "b.png"):
        ...     _ = (d / name).write_bytes(b"")
        >>> _ = (d / "m.csv").write_text("path,label,group,scale\\na.png,tumour,s1,20\\n"
        ...                              "b.png,normal,s2,5\\n")
        >>> m = read_manifest(d / "m.csv")
        >>> m.class_names, m.scale_names, m.label.tolist(), m.scale.tolist()
        (('normal', 'tumour'), ('5', '20'), [1, 0], [1, 0])
    """

    source: Path
    paths: list[str]
    label: np.ndarray
    group: np.ndarray
    scale: np.ndarray
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]
    scale_names: tuple[str, ...]
    split: np.ndarray | None = None
    fold: np.ndarray | None = None
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def scale_values(self) -> np.ndarray:
        """[N] each row's scale as an integer: the scale itself where every scale is a
        non-negative integer (magnifications), else its index into ``scale_names``."""
        if all(v.isdigit() for v in self.scale_names):
            return np.array([int(v) for v in self.scale_names], dtype=np.int64)[self.scale]
        return self.scale.copy()

    def index(self) -> BreakHisIndex:
        """The rows as the recipe's records (a `BreakHisIndex`: classes in ``subtype``,
        groups, integer scales in ``magnification``, binary ``label`` 0 until
        `BreakHisIndex.with_positive` names the positive classes).

        Examples:
            >>> import tempfile
            >>> d = Path(tempfile.mkdtemp())
            >>> for name in ("a.png", "b.png"):
            ...     _ = (d / name).write_bytes(b"")
            >>> _ = (d / "m.csv").write_text("path,label,group,scale\\na.png,tumour,s1,20\\n"
            ...                              "b.png,normal,s2,5\\n")
            >>> idx = read_manifest(d / "m.csv").index().with_positive(["tumour"])
            >>> idx.subtype_names, idx.label.tolist(), idx.magnification.tolist()
            (('normal', 'tumour'), [1, 0], [20, 5])
        """
        n = len(self)
        report: dict[str, Any] = {
            "manifest": str(self.source),
            "images": n,
            "rows_skipped": len(self.skipped),
            "groups": len(self.group_names),
            "group_by": "group",
            "per_class": {c: int((self.label == i).sum()) for i, c in enumerate(self.class_names)},
            "scales": ", ".join(self.scale_names),
        }
        if self.skipped:
            report["skipped_rows"] = [f"line {line}: {why}" for line, why in self.skipped]
        return BreakHisIndex(
            paths=list(self.paths),
            records=[],
            label=np.zeros(n, dtype=np.int64),
            subtype=self.label.copy(),
            group=self.group.copy(),
            magnification=self.scale_values(),
            group_names=list(self.group_names),
            group_by="group",
            label_names=BINARY_NAMES,
            subtype_names=self.class_names,
            report=report,
            split=None if self.split is None else self.split.copy(),
            fold=None if self.fold is None else self.fold.copy(),
        )


def is_manifest(path: str | Path) -> bool:
    """Whether ``path`` names a manifest (a ``.csv`` or ``.parquet`` file) rather than a
    directory of images.

    Args:
        path: ``--data`` / ``data.path``.

    Examples:
        >>> is_manifest("tiles/manifest.csv"), is_manifest("BreaKHis_v1")
        (True, False)
    """
    return Path(path).suffix.lower() in (".csv", ".parquet")


def data_folder(path: str | Path) -> Path:
    """The folder of a run's data: the directory itself, or a manifest's folder (what
    saved embeddings record as the data root, so that a moved copy is found again).

    Args:
        path: ``data.path``: a directory or a manifest.

    Examples:
        >>> data_folder("/data/tiles/manifest.csv").as_posix()
        '/data/tiles'
        >>> data_folder("/data/BreaKHis").as_posix()
        '/data/BreaKHis'
    """
    return Path(path).parent if is_manifest(path) else Path(path)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows as strings) of a CSV or Parquet file."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RecipeError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give a CSV"
            ) from e
        table = pq.read_table(path).to_pylist()
        names = list(pq.read_schema(path).names)
        rows = [{k: "" if v is None else str(v) for k, v in row.items()} for row in table]
        return names, rows
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names
                raise RecipeError(
                    f"{path} line {reader.line_num}: {len(names) + len(row[None])} fields, "
                    f"the header names {len(names)}"
                )
            rows.append({k: (v or "").strip() for k, v in row.items()})
        return names, rows


def _scale_order(values: set[str]) -> tuple[str, ...]:
    def number(v: str) -> float | None:
        try:
            x = float(v)
        except ValueError:
            return None
        return x if math.isfinite(x) else None

    if all(number(v) is not None for v in values):
        return tuple(sorted(values, key=lambda v: (number(v), v)))
    return tuple(sorted(values))


def read_manifest(
    path: str | Path,
    columns: Mapping[str, str] | None = None,
    missing_files: str = "error",
) -> Manifest:
    """Read and check a manifest.

    Args:
        path: a ``.csv`` file (a ``.parquet`` file with pyarrow installed).
        columns: the manifest's own names of our columns, e.g. ``{"path": "file",
            "group": "slide_id"}``; unnamed columns keep ours (``path``, ``label``,
            ``group``, ``scale``, ``split``, ``fold``).
        missing_files: ``"error"`` (a row whose file does not exist is an error) or
            ``"skip"`` (the row is left out, counted and listed in ``skipped``).

    Raises:
        RecipeError: one line naming the file, the line and the column: a missing
            column, an empty value, a missing file, a repeated path, a split value
            other than ``train``/``val``/``test``, a fold that is not a positive integer,
            a group with rows of two classes, or no rows left.

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "m.csv").write_text("file,label,group,scale\\nx.png,a,p1,10\\n")
        >>> try:
        ...     read_manifest(d / "m.csv", columns={"path": "file"})
        ... except RecipeError as e:
        ...     print(str(e).split(": ", 1)[1])
        line 2, column file: no file x.png
    """
    source = Path(path)
    if missing_files not in ("error", "skip"):
        raise ValueError(f"missing_files must be 'error' or 'skip', got {missing_files!r}")
    if not source.is_file():
        raise RecipeError(f"manifest {source} does not exist")
    names = {key: key for key in (*COLUMNS, *OPTIONAL_COLUMNS)} | dict(columns or {})
    header, rows = _read_rows(source)
    for key in COLUMNS:
        if names[key] not in header:
            raise RecipeError(
                f"{source}: no column {names[key]!r} (the {key} of each image; columns: "
                f"{', '.join(header)}); map another column with data.columns"
            )
    has = {key: names[key] in header for key in OPTIONAL_COLUMNS}
    if has["split"] and has["fold"]:
        raise RecipeError(f"{source}: give a split or a fold column, not both")
    kept: list[tuple[int, dict[str, str], str]] = []
    skipped: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, 2):
        where = f"{source}: line {line}"
        for key in COLUMNS:
            if not row[names[key]]:
                raise RecipeError(f"{where}, column {names[key]}: empty {key}")
        file = Path(row[names["path"]])
        file = file if file.is_absolute() else source.parent / file
        resolved = str(file.resolve())
        if resolved in first_line:
            raise RecipeError(
                f"{where}, column {names['path']}: repeats the image of line "
                f"{first_line[resolved]} ({row[names['path']]})"
            )
        first_line[resolved] = line
        if not file.is_file():
            if missing_files == "error":
                raise RecipeError(f"{where}, column {names['path']}: no file {row[names['path']]}")
            skipped.append((line, f"no file {row[names['path']]}"))
            continue
        kept.append((line, row, str(file)))
    if not kept:
        raise RecipeError(f"{source}: no rows to use ({len(skipped)} left out)")
    return _checked(source, names, kept, skipped, has)


def _checked(
    source: Path,
    names: dict[str, str],
    kept: list[tuple[int, dict[str, str], str]],
    skipped: list[tuple[int, str]],
    has: dict[str, bool],
) -> Manifest:
    """The `Manifest` of the kept rows, with the checks across rows."""
    class_of: dict[str, tuple[str, int]] = {}
    for line, row, _ in kept:
        group, label = row[names["group"]], row[names["label"]]
        seen = class_of.setdefault(group, (label, line))
        if seen[0] != label:
            raise RecipeError(
                f"{source}: line {line}, column {names['label']}: group {group!r} has class "
                f"{label!r} here and {seen[0]!r} on line {seen[1]} (a group is one patient: "
                "one class)"
            )
    classes = tuple(sorted({row[names["label"]] for _, row, _ in kept}))
    groups = tuple(sorted({row[names["group"]] for _, row, _ in kept}))
    scales = _scale_order({row[names["scale"]] for _, row, _ in kept})

    def codes(key: str, table: Sequence[str]) -> np.ndarray:
        lookup = {v: i for i, v in enumerate(table)}
        return np.array([lookup[row[names[key]]] for _, row, _ in kept], dtype=np.int64)

    split = fold = None
    if has["split"]:
        split = np.array([_split_value(source, names, line, row) for line, row, _ in kept])
    if has["fold"]:
        fold = np.array([_fold_value(source, names, line, row) for line, row, _ in kept])
    return Manifest(
        source=source,
        paths=[file for _, _, file in kept],
        label=codes("label", classes),
        group=codes("group", groups),
        scale=codes("scale", scales),
        class_names=classes,
        group_names=groups,
        scale_names=scales,
        split=split,
        fold=fold,
        lines=np.array([line for line, _, _ in kept], dtype=np.int64),
        skipped=skipped,
    )


def _split_value(source: Path, names: dict[str, str], line: int, row: dict[str, str]) -> str:
    value = row[names["split"]]
    if value not in SPLIT_VALUES:
        raise RecipeError(
            f"{source}: line {line}, column {names['split']}: {value!r} is not one of "
            f"{', '.join(SPLIT_VALUES)}"
        )
    return value


def _fold_value(source: Path, names: dict[str, str], line: int, row: dict[str, str]) -> int:
    value = row[names["fold"]]
    if not value.isdigit() or int(value) < 1:
        raise RecipeError(
            f"{source}: line {line}, column {names['fold']}: fold must be a positive integer, "
            f"got {value!r}"
        )
    return int(value)


def write_manifest(index: BreakHisIndex, path: str | Path, task: str = "subtype") -> Path:
    """Write a BreakHis index as a manifest (CSV): paths relative to the manifest where
    they lie under its folder, the subtype code (``task="subtype"``) or benign /
    malignant (``"binary"``) as the label, the group and the magnification.

    Args:
        index: a `BreakHisIndex` (from `scan_breakhis`).
        path: the CSV file to write (an existing file is an error).
        task: which label to write: ``"subtype"`` or ``"binary"``.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> index = scan_breakhis(root)
        >>> m = read_manifest(write_manifest(index, root / "manifest.csv"))
        >>> len(m) == len(index), m.scale_names
        (True, ('40', '100', '200', '400'))
    """
    if task not in ("subtype", "binary"):
        raise ValueError(f"task must be 'subtype' or 'binary', got {task!r}")
    out = Path(path)
    if out.exists():
        raise RecipeError(f"{out} exists: write the manifest to a new file")
    names: Sequence[Any] = index.subtype_names if task == "subtype" else index.label_names
    codes = index.subtype if task == "subtype" else index.label
    base = out.parent.resolve()
    with open(out, "x", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, file in enumerate(index.paths):
            p = Path(file).resolve()
            shown = p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)
            group = index.group_names[int(index.group[i])]
            writer.writerow([shown, names[int(codes[i])], group, int(index.magnification[i])])
    return out
