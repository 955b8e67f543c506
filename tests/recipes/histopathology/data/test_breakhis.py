"""BreakHis names and trees."""

import shutil

import numpy as np
import pytest
from recipe_helpers import tiny_png

from smse_metric.recipes.histopathology.data import (
    check_patient_disjoint,
    load_folds,
    parse_breakhis_filename,
    scan_breakhis,
)
from smse_metric.recipes.histopathology.data.breakhis import SUBTYPES


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("SOB_M_DC-14-13412-100-026.png", ("M", "DC", 14, "13412", "13412", 100, 26)),
        ("SOB_B_TA-14-16184CD-40-001.png", ("B", "TA", 14, "16184CD", "16184", 40, 1)),
        ("SOB_B_PT-14-21998AB-400-010.png", ("B", "PT", 14, "21998AB", "21998", 400, 10)),
        ("SOB_B_A-14-22549G-200-005.png", ("B", "A", 14, "22549G", "22549", 200, 5)),
    ],
)
def test_tricky_real_names_parse(name, want):
    r = parse_breakhis_filename(name)
    got = (r.tumor_class, r.subtype, r.year, r.slide_id, r.case_id, r.magnification, r.sequence)
    assert got == want and r.procedure == "SOB"
    assert parse_breakhis_filename(f"/some/dir/{name}") == r


@pytest.mark.parametrize(
    "name",
    [
        "SOB_B_A-14-22549AB-40.png",  # no sequence
        "SOB_X_A-14-22549AB-40-001.png",  # class X
        "SOB_B_DC-14-22549AB-40-001.png",  # malignant subtype under B
        "SOB_B_XX-14-22549AB-40-001.png",  # unknown subtype
        "SOB_B_A-14-22549AB-50-001.png",  # magnification 50
        "SOB_B_A-14-22549AB-40-001.jpg",
        "notes.png",
    ],
)
def test_malformed_names_fail_quoting_the_name(name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        parse_breakhis_filename(name)


def test_synthetic_tree_round_trips_through_scan_and_folds(synth):
    idx = scan_breakhis(synth)
    subtypes = {r.subtype for r in idx.records}
    assert subtypes == set(SUBTYPES)
    pairs = {(r.subtype, r.magnification) for r in idx.records}
    assert len(pairs) == 8 * 4  # every subtype at every magnification
    assert idx.report["images"] == len(idx) == idx.report["files_found"]
    assert (idx.label == np.isin(idx.subtype, [4, 5, 6, 7])).all()
    by_case = scan_breakhis(synth, group_by="case")
    assert by_case.report["groups"] <= idx.report["groups"] == 24
    for fold in range(1, 6):
        split = load_folds(synth / "Folds.csv", fold)
        masks = idx.masks(split)
        assert (masks["train"] ^ masks["test"]).all()  # every image in exactly one part
        check_patient_disjoint(masks, idx.group)
        assert 0.15 < masks["test"].mean() < 0.5


def test_mkfold_tree_keeps_each_image_once(tmp_path, synth):
    idx = scan_breakhis(synth)
    for fold, part in ((1, "train"), (1, "test"), (2, "train")):
        for path, rec in list(zip(idx.paths, idx.records, strict=True))[:10]:
            d = tmp_path / f"fold{fold}" / part / f"{rec.magnification}X"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, d)
    mk = scan_breakhis(tmp_path)
    assert len(mk) == 10 and mk.report["copies_skipped"] == 20


def test_duplicate_patient_13412_dc_copy_is_dropped_and_reported(tmp_path):
    base = tmp_path / "BreaKHis_v1/histology_slides/breast/malignant/SOB"
    for sub, folder in (("DC", "ductal_carcinoma"), ("LC", "lobular_carcinoma")):
        for i in (1, 2):
            name = f"SOB_M_{sub}-14-13412-100-00{i}.png"
            tiny_png(base / folder / f"SOB_M_{sub}_14-13412" / "100X" / name)
    kept = scan_breakhis(tmp_path)
    assert {r.subtype for r in kept.records} == {"LC"} and len(kept) == 2
    assert kept.report["duplicate_patient_dropped"] == 2
    assert "13412" in kept.report["duplicate_patient_note"]
    assert len(scan_breakhis(tmp_path, dedupe=False)) == 4


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        scan_breakhis(tmp_path / "missing")
    with pytest.raises(ValueError, match="no PNG images"):
        scan_breakhis(tmp_path)
    bad = tmp_path / "t1/benign/SOB/mystery_tumor/SOB_B_A_14-1/40X/SOB_B_A-14-1-40-001.png"
    tiny_png(bad)
    with pytest.raises(ValueError, match="unknown subtype folder"):
        scan_breakhis(tmp_path / "t1")
    wrong_mag = tmp_path / "t2/benign/SOB/adenosis/SOB_B_A_14-1/40X/SOB_B_A-14-1-100-001.png"
    tiny_png(wrong_mag)
    with pytest.raises(ValueError, match="contradicts magnification"):
        scan_breakhis(tmp_path / "t2")
    wrong_sub = tmp_path / "t3/benign/SOB/fibroadenoma/SOB_B_A_14-1/40X/SOB_B_A-14-1-40-001.png"
    tiny_png(wrong_sub)
    with pytest.raises(ValueError, match="contradicts subtype"):
        scan_breakhis(tmp_path / "t3")
    with pytest.raises(ValueError, match="group_by"):
        scan_breakhis(tmp_path, group_by="patient")
