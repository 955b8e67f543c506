"""What a machine collects: everything, except the parts whose extras are not installed
there (listed below, with the modules they need). The library-only install (`make
test-core`) therefore runs every test and doctest of the library without a hand-kept
list of files: a new module is in unless it is declared here as needing an extra."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RECIPE = ("timm", "PIL", "matplotlib", "tqdm")
#: path (relative to the repository, a folder or a file) -> the modules it needs
NEEDS: dict[str, tuple[str, ...]] = {
    "smse_metric/recipes": RECIPE,
    "tests/recipes": RECIPE,
    "tests/test_api_docs.py": RECIPE,  # documents the recipe's modules too
    "tests/recipe_helpers.py": RECIPE,
    "tests/test_docs.py": (*RECIPE, "pytorch_metric_learning", "faiss"),
    "tests/test_benchmarks.py": (*RECIPE, "pytorch_metric_learning", "sklearn"),
    "smse_metric/pml.py": ("pytorch_metric_learning",),
}


def missing_extras(path: str, installed=lambda m: importlib.util.find_spec(m) is not None):
    """The modules ``path`` needs that are not installed (empty: it is collected)."""
    needs = [
        m
        for prefix, ms in NEEDS.items()
        if path == prefix or path.startswith(prefix + "/")
        for m in ms
    ]
    return sorted({m for m in needs if not installed(m)})


collect_ignore = [str(ROOT / p) for p in NEEDS if missing_extras(p)]

#: doctests (by name) whose example needs an extra: skipped, with the reason, without it
DOCTEST_NEEDS: dict[str, tuple[str, ...]] = {
    "smse_metric.evaluation.index.FaissIndex": ("faiss",),
    "smse_metric.archive.index.ArchiveIndex": ("faiss",),
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        missing = [m for m in DOCTEST_NEEDS.get(item.name, ()) if not importlib.util.find_spec(m)]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"its example needs {', '.join(missing)}"))
