"""Tests mirror the package: every public source module has its test module at the same
place under tests/ (smse_metric/evaluation/knn.py -> tests/evaluation/test_knn.py).
Internal modules (``_name.py``) are tested through the public modules that use them."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_module_has_its_test_module():
    package = ROOT / "smse_metric"
    missing = []
    for source in sorted(package.rglob("*.py")):
        if source.name.startswith("_"):  # __init__, __main__, internal modules
            continue
        rel = source.relative_to(package)
        test = ROOT / "tests" / rel.parent / f"test_{source.stem}.py"
        if not test.is_file():
            missing.append(f"{rel} -> {test.relative_to(ROOT)}")
    assert not missing, missing
