"""The run's splits: patient-disjoint, validation from training, fold files."""

from pathlib import Path

import pytest
from recipe_helpers import TINY

from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.splits import load_splits


def test_splits_are_patient_disjoint_with_validation_from_training(root):
    s = load_splits(load_config("smse-triplet", TINY), root)
    assert not (s.train & s.val).any() and not (s.train & s.test).any()
    assert s.val.any() and s.test.any()
    for a, b in ((s.train, s.val), (s.train, s.test), (s.val, s.test)):
        assert not set(s.index.group[a]) & set(s.index.group[b])


def test_fold_files_by_pattern_match_folds_csv(root, tmp_path):
    import csv

    with open(root / "Folds.csv") as f:
        rows = list(csv.DictReader(f))
    for k in (1, 2):
        lines = [
            f"{Path(r['filename']).name}|{r['mag']}|{k}|{r['grp']}"
            for r in rows
            if int(r["fold"]) == k
        ]
        (tmp_path / f"dsfold{k}.txt").write_text("\n".join(lines) + "\n")
    for k in (1, 2):
        csv_cfg = load_config("smse-triplet", {**TINY, "data": {**TINY["data"], "fold": k}})
        ds_cfg = load_config(
            "smse-triplet",
            {
                **TINY,
                "data": {
                    **TINY["data"],
                    "fold": k,
                    "folds_file": str(tmp_path / "dsfold{fold}.txt"),
                },
            },
        )
        a, b = load_splits(csv_cfg, root), load_splits(ds_cfg, root)
        assert (a.test == b.test).all() and (a.train == b.train).all()
    ds_cfg.data.fold = 3
    with pytest.raises(ValueError, match=r"dsfold3\.txt does not exist"):
        load_splits(ds_cfg, root)
