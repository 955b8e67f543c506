"""BreakHis facts, file names and directory trees (fold files and patient splits are in
``data.folds``).

Facts and pitfalls (see the project's BREAKHIS notes): file names follow
``<PROC>_<CLASS>_<TYPE>-<YEAR>-<SLIDE>-<MAG>-<SEQ>.png``; patient 13412 is shipped
twice (as DC and LC, byte-identical); suffixed slide ids share case numbers and must
be compared exactly, never by substring.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import RecipeError

__all__ = [
    "MAGNIFICATIONS",
    "SUBTYPES",
    "TUMOR_CLASSES",
    "BreakHisIndex",
    "BreakHisRecord",
    "class_names",
    "parse_breakhis_filename",
    "scan_breakhis",
]

#: subtype code -> (tumour class, folder name); the order defines subtype label ids
SUBTYPES = {
    "A": ("B", "adenosis"),
    "F": ("B", "fibroadenoma"),
    "PT": ("B", "phyllodes_tumor"),
    "TA": ("B", "tubular_adenoma"),
    "DC": ("M", "ductal_carcinoma"),
    "LC": ("M", "lobular_carcinoma"),
    "MC": ("M", "mucinous_carcinoma"),
    "PC": ("M", "papillary_carcinoma"),
}
MAGNIFICATIONS = (40, 100, 200, 400)
#: the binary task's classes, label 0 and 1 (tumour class ``B`` and ``M``); also the
#: names of BreakHis's top-level folders
TUMOR_CLASSES = ("benign", "malignant")
#: Ruifrok & Johnston's stain vectors (optical density per unit of stain): hematoxylin,
#: eosin, and the residual (DAB) channel; rows are R, G, B absorbances
STAIN_VECTORS = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))
#: the patient shipped twice; the DC copy is dropped by ``dedupe``
DUPLICATED_SLIDE, DUPLICATE_SUBTYPE = "13412", "DC"

_NAME = re.compile(
    r"^(?P<procedure>[A-Z]+)_(?P<tumor_class>[BM])_(?P<subtype>[A-Z]+)-(?P<year>\d{2})-"
    r"(?P<slide>(?P<case>\d+)[A-Z]*)-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)
_FOLDER_TO_SUBTYPE = {folder: code for code, (_, folder) in SUBTYPES.items()}


@dataclass(frozen=True)
class BreakHisRecord:
    """The fields of one BreakHis file name.

    Attributes:
        procedure: biopsy procedure, ``"SOB"`` in BreakHis.
        tumor_class: ``"B"`` (benign) or ``"M"`` (malignant).
        subtype: subtype code: A, F, PT, TA, DC, LC, MC or PC.
        year: the two-digit year of the file name.
        slide_id: the slide token, digits and optional letters (``"22549AB"``).
        case_id: the numeric case of the slide (``"22549"``).
        magnification: 40, 100, 200 or 400.
        sequence: the image's number within its slide and magnification.

    Examples:
        >>> r = parse_breakhis_filename("SOB_M_DC-14-2523-400-012.png")
        >>> r.tumor_class, r.subtype, r.slide_id, r.magnification, r.sequence
        ('M', 'DC', '2523', 400, 12)
    """

    procedure: str
    tumor_class: str  #: "B" (benign) or "M" (malignant)
    subtype: str  #: A, F, PT, TA, DC, LC, MC or PC
    year: int
    slide_id: str  #: e.g. "22549AB": the patient token of the official protocol
    case_id: str  #: e.g. "22549": the numeric case, shared by suffixed slides
    magnification: int
    sequence: int


def parse_breakhis_filename(name: str | Path) -> BreakHisRecord:
    """Parse ``SOB_B_A-14-22549AB-40-001.png`` (a bare name or a path).

    Args:
        name: a file name or path; only its last part is parsed.

    Raises:
        RecipeError: quoting the name, when it does not follow the grammar, names an
            unknown subtype or magnification, or a subtype of the other class.

    Examples:
        >>> r = parse_breakhis_filename("SOB_B_TA-14-16184CD-40-001.png")
        >>> r.subtype, r.slide_id, r.case_id, r.magnification
        ('TA', '16184CD', '16184', 40)
    """
    base = Path(name).name
    m = _NAME.match(base)
    if m is None:
        raise RecipeError(
            f"{base!r} is not a BreakHis file name "
            "(<PROC>_<B|M>_<TYPE>-<YEAR>-<SLIDE>-<MAG>-<SEQ>.png)"
        )
    subtype, tumor_class = m["subtype"].upper(), m["tumor_class"].upper()
    if subtype not in SUBTYPES:
        raise RecipeError(f"{base!r} has unknown subtype {subtype!r} (known: {list(SUBTYPES)})")
    if SUBTYPES[subtype][0] != tumor_class:
        raise RecipeError(f"{base!r}: subtype {subtype} is not of class {tumor_class}")
    mag = int(m["mag"])
    if mag not in MAGNIFICATIONS:
        raise RecipeError(f"{base!r} has magnification {mag}, not one of {MAGNIFICATIONS}")
    return BreakHisRecord(
        procedure=m["procedure"].upper(),
        tumor_class=tumor_class,
        subtype=subtype,
        year=int(m["year"]),
        slide_id=m["slide"].upper(),
        case_id=m["case"],
        magnification=mag,
        sequence=int(m["seq"]),
    )


@dataclass
class BreakHisIndex:
    """The recipe's images, one row each (numpy arrays of length N): found by
    `scan_breakhis`, or a manifest's rows (`Manifest.index`).

    ``label`` is binary (BreakHis: 0 benign, 1 malignant); ``subtype`` indexes
    ``subtype_names`` (the classes: BreakHis's subtype codes, or a manifest's labels);
    ``group`` indexes ``group_names`` (slides, cases or a manifest's groups);
    ``report`` says what the scan found, dropped and why.

    Attributes:
        paths: image file paths, one per row.
        records: the parsed file name of each row (`BreakHisRecord`; a manifest's: none).
        label: [N] binary label (BreakHis: 0 benign, 1 malignant).
        subtype: [N] index into ``subtype_names``.
        group: [N] index into ``group_names`` (a slide or a case).
        magnification: [N] the scale (BreakHis: 40, 100, 200 or 400).
        group_names: the patient id of each group index.
        group_by: ``"slide"`` or ``"case"`` (BreakHis), ``"group"`` (a manifest).
        label_names: names of the binary labels.
        subtype_names: the classes, in index order (BreakHis: the eight subtype codes).
        report: what the scan found, dropped and why (counts, the duplicated patient).
        split: [N] a manifest's ``"train"`` / ``"val"`` / ``"test"`` column, or None.
        fold: [N] a manifest's fold column, or None.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> index = scan_breakhis(root)
        >>> len(index) == len(index.paths) == len(index.label), index.report["groups"]
        (True, 24)
        >>> small = index.subset(index.magnification == 40)
        >>> set(small.magnification.tolist())
        {40}
    """

    paths: list[str]
    records: list[BreakHisRecord]
    label: np.ndarray
    subtype: np.ndarray
    group: np.ndarray
    magnification: np.ndarray
    group_names: list[str]
    group_by: str
    label_names: tuple[str, ...] = ("benign", "malignant")
    subtype_names: tuple[str, ...] = tuple(SUBTYPES)
    report: dict = field(default_factory=dict)
    split: np.ndarray | None = None
    fold: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> list[str]:
        return [Path(p).name for p in self.paths]

    def subset(self, mask_or_indices) -> BreakHisIndex:
        """The rows selected by a boolean mask or an index array (groups keep their ids)."""
        idx = np.arange(len(self))[np.asarray(mask_or_indices)]
        return dataclasses.replace(
            self,
            paths=[self.paths[i] for i in idx],
            records=[self.records[i] for i in idx] if self.records else [],
            label=self.label[idx],
            subtype=self.subtype[idx],
            group=self.group[idx],
            magnification=self.magnification[idx],
            report=dict(self.report),
            split=None if self.split is None else self.split[idx],
            fold=None if self.fold is None else self.fold[idx],
        )

    def with_positive(self, classes: list[str] | tuple[str, ...]) -> BreakHisIndex:
        """The index with binary ``label`` 1 for the rows of ``classes`` (names of
        ``subtype_names``), 0 for the others; raises naming an unknown class.

        Args:
            classes: the classes of label 1 (``data.positive_classes``).

        Examples:
            >>> idx = BreakHisIndex(["a", "b", "c"], [], np.zeros(3, int), np.array([0, 4, 2]),
            ...                     np.zeros(3, int), np.full(3, 40), ["p"], "slide")
            >>> idx.with_positive(["DC", "PT"]).label.tolist()  # codes 4 and 2
            [0, 1, 1]
        """
        unknown = sorted(set(classes) - set(self.subtype_names))
        if unknown:
            raise RecipeError(
                f"data.positive_classes: {unknown[0]!r} is not a class of the data "
                f"(classes: {', '.join(self.subtype_names)})"
            )
        positive = np.isin(np.asarray(self.subtype_names), list(classes))
        return dataclasses.replace(self, label=positive[self.subtype].astype(np.int64))

    def masks(self, split: dict[str, set[str]]) -> dict[str, np.ndarray]:
        """Boolean masks from a fold split (``{"train": {file names}, ...}``), as
        `load_folds` returns; raises if a listed file is not in the index."""
        names = np.array(self.names)
        out = {}
        for part, files in split.items():
            m = np.isin(names, list(files))
            missing = len(files) - int(m.sum())
            if missing:
                example = next(iter(set(files) - set(names[m].tolist())))
                raise RecipeError(
                    f"{missing} files of split {part!r} are not in the index, e.g. {example!r}"
                )
            out[part] = m
        return out


def _check_folders(path: Path, rec: BreakHisRecord) -> None:
    """Folders that name a class, subtype, magnification or patient must agree with the name."""
    for part in path.parts[:-1]:
        low = part.lower()
        if low in ("benign", "malignant") and low[0].upper() != rec.tumor_class:
            raise RecipeError(f"{path}: folder {part!r} contradicts class {rec.tumor_class}")
        if low in _FOLDER_TO_SUBTYPE and _FOLDER_TO_SUBTYPE[low] != rec.subtype:
            raise RecipeError(f"{path}: folder {part!r} contradicts subtype {rec.subtype}")
        m = re.fullmatch(r"(\d+)X", part, re.IGNORECASE)
        if m and int(m[1]) != rec.magnification:
            raise RecipeError(
                f"{path}: folder {part!r} contradicts magnification {rec.magnification}"
            )
        m = re.fullmatch(r"[A-Z]+_[BM]_([A-Z]+)_\d{2}-(\w+)", part, re.IGNORECASE)
        if m and (m[1].upper() != rec.subtype or m[2].upper() != rec.slide_id):
            raise RecipeError(f"{path}: patient folder {part!r} contradicts the file name")


def _check_subtype_folders(root: Path) -> None:
    for cls in ("benign", "malignant"):
        for sob in root.rglob(f"{cls}/SOB"):
            for child in sob.iterdir():
                if child.is_dir() and child.name.lower() not in _FOLDER_TO_SUBTYPE:
                    raise RecipeError(
                        f"unknown subtype folder {child} (known: {sorted(_FOLDER_TO_SUBTYPE)})"
                    )


def scan_breakhis(root: str | Path, group_by: str = "slide", dedupe: bool = True) -> BreakHisIndex:
    """Index every BreakHis image under ``root``.

    Recognises the original tree (``.../benign/SOB/<subtype>/<patient>/<MAG>X/*.png``),
    the Kaggle copy of it (same tree, with ``Folds.csv``) and the mkfold tree
    (``fold<k>/{train,test}/<MAG>X/*.png``, where each image appears in every fold:
    copies of one file name are kept once and counted).

    Args:
        group_by: ``"slide"`` (82 patients, the official protocol) or ``"case"``
            (numeric case: 70 groups, stricter against leakage).
        dedupe: drop the DC copy of patient 13412, which BreakHis also ships as LC.
        root: a directory holding a BreakHis tree (original, Kaggle or mkfold).

    Raises:
        RecipeError: for a missing or empty directory, an unknown subtype folder, a
            malformed file name, or a folder that contradicts its file's name.

    Examples:
        >>> import tempfile
        >>> from smse_metric.recipes.histopathology.data import (
        ...     make_synthetic_breakhis, scan_breakhis)
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> index = scan_breakhis(root, group_by="slide")
        >>> sorted(set(index.magnification.tolist())), index.report["duplicate_patient_dropped"]
        ([40, 100, 200, 400], 0)
    """
    if group_by not in ("slide", "case"):
        raise RecipeError(f"group_by must be 'slide' or 'case', got {group_by!r}")
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(f"{root} is not a directory")
    if root.resolve() == Path(root.resolve().anchor):  # a walk of every mounted disk
        raise RecipeError(
            f"refusing to scan {root}, the filesystem root: give the dataset's directory"
        )
    _check_subtype_folders(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise RecipeError(f"no PNG images under {root}: is this a BreakHis directory?")
    seen: dict[str, Path] = {}
    copies = 0
    dropped: list[str] = []
    for path in files:
        rec = parse_breakhis_filename(path.name)
        _check_folders(path.relative_to(root), rec)
        if path.name in seen:
            copies += 1
            continue
        if dedupe and rec.slide_id == DUPLICATED_SLIDE and rec.subtype == DUPLICATE_SUBTYPE:
            dropped.append(path.name)
            continue
        seen[path.name] = path
    paths = list(seen.values())
    records = [parse_breakhis_filename(p.name) for p in paths]
    keys = [r.slide_id if group_by == "slide" else r.case_id for r in records]
    group_names, group = np.unique(np.array(keys), return_inverse=True)
    report = {
        "root": str(root),
        "images": len(paths),
        "files_found": len(files),
        "copies_skipped": copies,
        "duplicate_patient_dropped": len(dropped),
        "groups": len(group_names),
        "group_by": group_by,
        "per_subtype": dict(Counter(r.subtype for r in records)),
    }
    if dropped:
        report["duplicate_patient_note"] = (
            f"dropped {len(dropped)} images of patient {DUPLICATED_SLIDE} labelled "
            f"{DUPLICATE_SUBTYPE}: BreakHis ships the same images as LC too"
        )
    subtype_ids = {code: i for i, code in enumerate(SUBTYPES)}
    return BreakHisIndex(
        paths=[str(p) for p in paths],
        records=records,
        label=np.array([r.tumor_class == "M" for r in records], dtype=np.int64),
        subtype=np.array([subtype_ids[r.subtype] for r in records], dtype=np.int64),
        group=group.astype(np.int64),
        magnification=np.array([r.magnification for r in records], dtype=np.int64),
        group_names=group_names.tolist(),
        group_by=group_by,
        report=report,
    )


def class_names(task: str) -> tuple[str, ...]:
    """The class names of a task, in label order.

    Args:
        task: ``"binary"`` (benign / malignant) or ``"subtype"`` (the eight codes).

    Examples:
        >>> class_names("binary"), class_names("subtype")[:3]
        (('benign', 'malignant'), ('A', 'F', 'PT'))
    """
    if task == "binary":
        return TUMOR_CLASSES
    if task == "subtype":
        return tuple(SUBTYPES)
    raise RecipeError(f"task must be 'binary' or 'subtype', got {task!r}")
