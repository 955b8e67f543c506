# One-command entry points. Everything installs into .venv with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	@echo "smse-metric demo: the training demo arrives with the recipe (issue 6)."
	@echo "Meanwhile, the loss benchmark smoke run:"
	$(PY) -m benchmarks.bench_losses --quick

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check smse_metric tests benchmarks

test: install lint
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks.bench_losses

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
