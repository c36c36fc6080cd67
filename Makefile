# Set-up from nothing: `make test` and `make demo` create .venv, install the project, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where `make demo` writes data, checkpoints and the MLflow database.
DEMO_DIR ?= outputs/demo

.PHONY: venv system-packages test test-slow test-all lint format demo bench clean

# System packages some tests need, installed with apt-get only when missing: Chromium (the Serve
# web page's browser test) and a Java runtime (METEOR in evaluation). Without apt-get, say which.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-packages:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			echo "installing system packages:$$missing (log: /tmp/osprey-apt.log)"; \
			{ $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; } \
				> /tmp/osprey-apt.log 2>&1 || { tail -n 30 /tmp/osprey-apt.log; exit 1; }; \
		else \
			echo "please install these system packages:$$missing" >&2; \
		fi; \
	fi

# pip's own output (and this machine's index warnings) goes to a log; the last lines show on failure.
$(STAMP): pyproject.toml | system-packages
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project and its dev extra into $(VENV) (2-3 min; log: $(VENV)/install.log)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[dev]'; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check osprey jobs serve tests bench
	$(VENV)/bin/ruff format --check osprey jobs serve tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix osprey jobs serve tests bench
	$(VENV)/bin/ruff format osprey jobs serve tests bench

# The suite without the end-to-end tests marked `slow` (Ray jobs, multi-stage training), which
# `make test-slow` runs; CI (.ci/run) runs both, `make test-all` both in one pytest run.
test: lint
	$(PY) -m pytest -q -ra -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -ra -m slow

test-all: lint
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) -m osprey.cli demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(PY) bench/model_forward.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
