"""Every public symbol has a docstring with an example (run by --doctest-modules)."""

import importlib
import inspect

import pytest

PUBLIC_MODULES = [
    "smse_metric", "smse_metric.functional", "smse_metric.losses", "smse_metric.miners",
    "smse_metric.samplers", "smse_metric.evaluation", "smse_metric.symmetric_knn",
    "smse_metric.distributed",
    "smse_metric.models", "smse_metric.data", "smse_metric.data.dataset", "smse_metric.recipes",
    "smse_metric.recipes.breakhis", "smse_metric.recipes.engine", "smse_metric.recipes.search",
    "smse_metric.recipes.demo", "smse_metric.recipes.compare", "smse_metric.recipes.rundir",
    "smse_metric.report",
]  # fmt: skip


def _public():
    seen = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return seen


PUBLIC = _public()


def test_there_are_public_symbols():
    assert len(PUBLIC) > 40


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_symbol_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(PUBLIC[name]) or ""
    assert len(doc) > 40, f"{name} has no real docstring"
    assert ">>>" in doc, f"{name} has no example"
