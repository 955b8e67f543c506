# One-command entry points. Everything installs into .venv with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-core lint docs bench bench-quick clean

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

docs: install
	$(PY) docs/scripts/plot_rfl.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

test: install lint docs
	$(PY) -m pytest

# The library alone (torch + numpy, no extras) in its own venv: what `pip install
# smse-metric` users get. The same pytest run as `make test`; the root conftest.py leaves
# out what needs an extra that is not installed (the recipe, the PML adapters, ...).
CORE_VENV ?= .venv-core

$(CORE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -p no:cacheprovider

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick --out build/bench-quick

clean:
	rm -rf $(VENV) $(CORE_VENV) build site *.egg-info .pytest_cache .ruff_cache .hypothesis
