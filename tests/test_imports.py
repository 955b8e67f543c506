"""`import smse_metric` needs torch and numpy only: the heavy optional packages are
imported where they are used, with an error naming the extra when one is missing."""

import json
import subprocess
import sys

import pytest

OPTIONAL = ["faiss", "timm", "matplotlib", "PIL", "tqdm", "pytorch_metric_learning", "sklearn"]


def _loaded(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    return {m.split(".")[0] for m in json.loads(out.stdout.splitlines()[-1])}


def test_importing_the_library_loads_no_optional_package():
    base = _loaded("import torch, numpy")  # torch.hub itself imports tqdm when present
    core = _loaded("import smse_metric, smse_metric.functional")
    extra = (core - base) & set(OPTIONAL)
    assert not extra, f"import smse_metric loaded {sorted(extra)}"


def test_a_missing_faiss_is_named_with_its_extra(monkeypatch):
    from smse_metric.evaluation import FaissIndex

    monkeypatch.setitem(sys.modules, "faiss", None)  # what an install without faiss gives
    with pytest.raises(ImportError, match=r"smse-metric\[faiss\]"):
        FaissIndex(__import__("numpy").zeros((4, 2), dtype="float32"))


def test_no_module_imports_another_modules_private_names():
    """What two modules share is public, or lives in an internal module that says so
    (``functional._common``, ``evaluation._inputs``); attribute access to private names
    of other objects is ruff's SLF001, on in pyproject.toml."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "smse_metric"
    internal = {p.stem for p in root.rglob("_*.py") if not p.name.startswith("__")}
    for name in internal:  # each internal module says so in its first words
        (path,) = root.rglob(f"{name}.py")
        assert ast.get_docstring(ast.parse(path.read_text())).startswith("Internal"), path
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level or (node.module or "").startswith("smse_metric"):
                offenders += [
                    f"{path.relative_to(root)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                    and not a.name.startswith("__")
                    and a.name not in internal
                ]
    assert not offenders, offenders
