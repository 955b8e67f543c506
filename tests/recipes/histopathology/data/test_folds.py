"""Fold files and patient-disjoint splits."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smse_metric.recipes.histopathology.data import (
    check_patient_disjoint,
    load_folds,
    patient_split,
    scan_breakhis,
)


def test_dsfold_file_parses(tmp_path, synth):
    idx = scan_breakhis(synth)
    names = idx.names
    rows = [
        f"{n}|{r.magnification}|1|{'test' if i % 3 == 0 else 'train'}"
        for i, (n, r) in enumerate(zip(names, idx.records, strict=True))
    ]
    rows += [f"{n}|{r.magnification}|2|train" for n, r in zip(names, idx.records, strict=True)]
    (tmp_path / "dsfold1.txt").write_text("\n".join(rows) + "\n")
    split = load_folds(tmp_path / "dsfold1.txt", 1)
    assert len(split["test"]) == len(range(0, len(names), 3))
    assert len(split["train"]) + len(split["test"]) == len(names)
    with pytest.raises(ValueError, match="no rows for fold 3"):
        load_folds(tmp_path / "dsfold1.txt", 3)
    (tmp_path / "bad.txt").write_text("a|b\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1"):
        load_folds(tmp_path / "bad.txt", 1)


@given(test=st.floats(0.1, 0.5), val=st.floats(0.0, 0.3), seed=st.integers(0, 1000))
def test_patient_split_is_disjoint_stratified_and_deterministic(synth_index, test, val, seed):
    masks = patient_split(synth_index, test, val, seed=seed)
    assert (masks["train"].astype(int) + masks["val"] + masks["test"] == 1).all()
    check_patient_disjoint(masks, synth_index.group)
    for sub in range(8):  # every subtype keeps training patients
        assert (masks["train"] & (synth_index.subtype == sub)).any()
    again = patient_split(synth_index, test, val, seed=seed)
    assert all((masks[k] == again[k]).all() for k in masks)


def test_patient_split_errors_and_overlap_check(synth_index):
    with pytest.raises(ValueError, match="test_fraction"):
        patient_split(synth_index, 1.2)
    with pytest.raises(ValueError, match="below 1"):
        patient_split(synth_index, 0.6, 0.5)
    m = np.zeros(len(synth_index), bool)
    m[:5] = True
    with pytest.raises(ValueError, match="is in both"):
        check_patient_disjoint({"train": m, "test": m.copy()}, synth_index.group)
