"""Data: BreakHis parsing and scanning, fold files, splits, and a synthetic BreakHis."""

from .breakhis import BreakHisIndex, BreakHisRecord, parse_breakhis_filename, scan_breakhis
from .folds import check_patient_disjoint, load_folds, patient_split
from .synthetic import make_synthetic_breakhis

__all__ = [
    "BreakHisIndex",
    "BreakHisRecord",
    "check_patient_disjoint",
    "load_folds",
    "make_synthetic_breakhis",
    "parse_breakhis_filename",
    "patient_split",
    "scan_breakhis",
]
