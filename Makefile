# Set-up from nothing: `make test` and `make demo` create .venv, install the project, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where `make demo` writes data, checkpoints and the MLflow database.
DEMO_DIR ?= outputs/demo

.PHONY: venv test test-fast lint format demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check osprey jobs tests bench
	$(VENV)/bin/ruff format --check osprey jobs tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix osprey jobs tests bench
	$(VENV)/bin/ruff format osprey jobs tests bench

test: lint
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(PY) -m osprey.cli demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(PY) bench/model_forward.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
