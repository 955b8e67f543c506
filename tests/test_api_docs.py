"""Every public symbol has a docstring with an example (run by --doctest-modules)."""

import dataclasses
import importlib
import inspect

import pytest

APP = "smse_metric.recipes.histopathology"
PUBLIC_MODULES = [
    "smse_metric",
    "smse_metric.functional",
    "smse_metric.losses",
    "smse_metric.miners",
    "smse_metric.samplers",
    "smse_metric.evaluation",
    "smse_metric.archive",
    "smse_metric.distributed",
    "smse_metric.pml",
    *(
        f"{APP}{m}"
        for m in (
            "",
            ".models",
            ".data",
            ".data.breakhis",
            ".data.dataset",
            ".training",
            ".trainer",
            ".step",
            ".checkpoint",
            ".interrupt",
            ".launch",
            ".fit",
            ".inputs",
            ".lock",
            ".saved",
            ".splits",
            ".build",
            ".evaluate",
            ".errors",
            ".folds",
            ".search",
            ".archive",
            ".archive_cli",
            ".demo",
            ".compare",
            ".rundir",
            ".report",
            ".results",
        )
    ),
]


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


def _signature_parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p.name
        for p in inspect.signature(target).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in skip
    ]


def _documented(obj) -> set[str]:
    """Names in the Args (or, for dataclasses, Attributes) section as griffe parses it,
    which is what the API pages render."""
    from griffe import Docstring, Parser

    sections = Docstring(inspect.getdoc(obj) or "", parser=Parser.google).parse()
    kinds = {"parameters"} | ({"attributes"} if dataclasses.is_dataclass(obj) else set())
    return {item.name for s in sections if s.kind.value in kinds for item in s.value}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_parameter_is_documented_on_its_own_line(name):
    """One documented parameter per line: ``a: ...; b: ...`` on one line renders as
    ``a`` alone, and ``b`` disappears from the API page."""
    obj = PUBLIC[name]
    missing = [p for p in _signature_parameters(obj) if p not in _documented(obj)]
    assert not missing, f"{name}: {missing} missing from its Args section"
