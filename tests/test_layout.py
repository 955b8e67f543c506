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


def _selection():
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_core_run_selects_by_location_so_new_library_modules_are_in():
    """Without any extra installed, a new library module and its test are collected (no
    hand list to forget them in); the recipe and the PML adapters are not."""
    missing = _selection().missing_extras

    def nothing(module):  # a machine with no extra installed
        return False

    for path in (
        "smse_metric/new_module.py",
        "smse_metric/evaluation/new.py",
        "tests/test_new_module.py",
        "tests/evaluation/test_new.py",
    ):
        assert missing(path, nothing) == [], path
    for path in (
        "smse_metric/recipes/histopathology/new.py",
        "tests/recipes/x/test_new.py",
        "smse_metric/pml.py",
    ):
        assert missing(path, nothing), path
    assert missing("smse_metric/recipes/histopathology/new.py", lambda m: True) == []


def test_every_library_module_outside_the_declared_extras_is_core():
    """The declared exceptions stay few: the recipe, the PML adapters and the tests that
    document or run them."""
    needs = _selection().NEEDS
    library = [k for k in needs if k.startswith("smse_metric/")]
    assert sorted(library) == ["smse_metric/pml.py", "smse_metric/recipes"]
