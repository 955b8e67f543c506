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


def _console(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_console_script_says_its_version_from_the_library_alone():
    import smse_metric

    out = _console(
        "import sys; sys.modules['PIL'] = None\n"  # as without the [recipe] extra
        "from smse_metric._launcher import main\n"
        "rc = main(['--version'])\n"
        "assert 'smse_metric.recipes' not in sys.modules\n"
        "sys.exit(rc)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"smse-metric {smse_metric.__version__} (torch ")


def test_the_console_script_without_the_recipe_extra_is_one_line_naming_it():
    out = _console(
        "import sys; sys.modules['PIL'] = None\n"
        "from smse_metric._launcher import main\n"
        "sys.exit(main(['train', '--help']))"
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "smse-metric: the command line needs the [recipe] extra (PIL is missing): "
        "pip install 'smse-metric[recipe]'"
    ]
