# One-command entry points. Everything installs into .venv with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-core dist lint docs bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m smse_metric demo --out runs/demo --overwrite

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

docs: install
	$(PY) docs/scripts/plot_rfl.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

test: install lint docs
	$(PY) -m pytest

# The library alone (torch + numpy, no extras) as users get it: the sdist is built, the
# wheel built from that sdist is installed (not editable) into its own venv, and the test
# suite runs from a folder outside the source tree against the installed package (the
# root conftest.py leaves out what needs an extra that is not installed: the recipe, the
# PML adapters, ...). A file missing from the sdist or the wheel fails here. The
# library's doctests run in `make test`.
CORE_VENV ?= .venv-core
DIST ?= build/dist
CORE_PY := $(abspath $(CORE_VENV))/bin/python

$(CORE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet build "setuptools>=77" "torch>=2.4" numpy "pytest>=7" "hypothesis>=6"
	touch $@

dist: $(CORE_VENV)/.installed
	rm -rf $(DIST) && mkdir -p build
	$(CORE_PY) -m build --no-isolation --outdir $(DIST) . > build/dist.log

test-core: dist
	$(CORE_PY) -m pip install --quiet --force-reinstall --no-deps $(DIST)/*.whl
	$(CORE_PY) -m pip install --quiet "$$(ls $(DIST)/*.whl)[test]"
	cd "$$(mktemp -d)" && $(CORE_PY) -c "import smse_metric, pathlib as p; f = p.Path(smse_metric.__file__); assert f.parent != p.Path('$(CURDIR)/smse_metric'), f; assert (f.parent / 'py.typed').is_file(); assert list((f.parent / 'recipes/histopathology/configs').glob('*.toml'))"
	cd "$$(mktemp -d)" && $(CORE_PY) -m pytest -p no:cacheprovider "$(CURDIR)/tests"
	$(abspath $(CORE_VENV))/bin/smse-metric --version

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick --out build/bench-quick

clean:
	rm -rf $(VENV) $(CORE_VENV) build site *.egg-info .pytest_cache .ruff_cache .hypothesis
