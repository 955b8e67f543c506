"""The README's and the docs' Python examples run as written, page by page, so they
cannot drift from the code; the RFL figure script runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_docs_have_examples():
    with_code = [p.relative_to(ROOT).as_posix() for p in PAGES if _blocks(p)]
    assert {"README.md", "docs/index.md", "docs/quickstart.md", "docs/howto/pml.md"} <= set(
        with_code
    )


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(_blocks(page)):
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)


def test_rfl_figure_is_drawn(tmp_path):
    import runpy

    script = runpy.run_path(str(ROOT / "docs" / "scripts" / "plot_rfl.py"))
    out = script["main"](tmp_path / "rfl.png")
    assert out.stat().st_size > 10_000
    curves = script["curves"](__import__("torch").tensor([0.01, 0.5, 0.99]))
    rfl_loss, rfl_grad = curves["RFL, alpha = 2, gamma = 1.5"]
    ce_loss, _ = curves["cross-entropy"]
    assert rfl_loss.max() <= 2.0 < ce_loss.max()  # bounded, where CE is not
    assert abs(rfl_grad[0]) < abs(rfl_grad[1])  # hopeless samples get less push
    assert os.path.basename(out) == "rfl.png"


def _docs_copy(tmp_path: Path) -> Path:
    """The docs project in a scratch directory (code and included files linked)."""
    import shutil

    copy = tmp_path / "site-src"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", copy / "docs")
    for name in ("smse_metric", "benchmarks", "README.md"):
        (copy / name).symlink_to(ROOT / name)
    return copy


def _build(project: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(project / "out")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env, timeout=600)


def test_the_strict_docs_build_fails_on_one_broken_reference(tmp_path):
    """`make docs` must be able to fail: the same build, one unresolvable reference."""
    docs_rule = [x for x in (ROOT / "Makefile").read_text().splitlines() if "mkdocs build" in x]
    assert docs_rule and all("--strict" in x and "--quiet" not in x for x in docs_rule)
    project = _docs_copy(tmp_path)
    page = project / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [nothing][smse_metric.no_such_symbol].\n")
    broken = _build(project)
    assert broken.returncode != 0
    log = broken.stdout + broken.stderr
    assert "no_such_symbol" in log and "Aborted" in log


def test_the_foundation_model_table_is_the_one_the_recipe_uses():
    """docs/howto/backbones.md's table of timm arguments and pooling, row by row, against
    `models.FOUNDATION_MODELS` (what an empty model.backbone_kwargs / pool becomes)."""
    import tomllib

    from smse_metric.recipes.histopathology.models import FOUNDATION_MODELS

    text = (ROOT / "docs" / "howto" / "backbones.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `(hf-hub:[^`]+)` \| `(\{.*?\})` \| `\"(\w+)\"` \|", text, re.M)
    assert len(rows) == len(FOUNDATION_MODELS)
    for name, kwargs, pool in rows:
        want_kwargs, want_pool = FOUNDATION_MODELS[name]
        documented = tomllib.loads(f"k = {kwargs}")["k"]
        assert documented == pytest.approx(want_kwargs) and pool == want_pool, name


def test_the_readme_links_work_off_the_repository():
    """The README is the package's page on an index, where a relative link is broken:
    every link is absolute, and files of the source tree are named as paths."""
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if not link.startswith(("https://", "http://"))]
    assert links and not relative, relative
