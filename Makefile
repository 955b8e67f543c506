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

# The library alone (torch + numpy, no extras) in its own venv, with the tests that need
# nothing else: what `pip install smse-metric` users get.
CORE_VENV ?= .venv-core
CORE_TESTS := tests/functional tests/evaluation tests/test_losses.py tests/test_miners.py \
	tests/test_samplers.py tests/test_distributed.py tests/test_imports.py tests/test_layout.py \
	tests/test_faults_library.py \
	smse_metric/functional smse_metric/losses.py smse_metric/miners.py \
	smse_metric/samplers.py smse_metric/distributed.py smse_metric/evaluation/symmetric.py \
	smse_metric/evaluation/torch_index.py smse_metric/evaluation/knn.py \
	smse_metric/evaluation/evaluate.py smse_metric/evaluation/metrics.py

$(CORE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -p no:cacheprovider $(CORE_TESTS)

bench: install
	$(PY) -m benchmarks

bench-quick: install
	$(PY) -m benchmarks --quick --out build/bench-quick

clean:
	rm -rf $(VENV) $(CORE_VENV) build site *.egg-info .pytest_cache .ruff_cache .hypothesis
