# One-command entry points. Everything installs into .venv with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint docs bench bench-quick clean

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

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick --out build/bench-quick

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache .hypothesis
