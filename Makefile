# Entry points. `make run` and `make test` work on a fresh clone: both run
# `make install` first, which is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(PYTHON) -m uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy

.PHONY: install system-deps run test lint bench docker-image clean

install: system-deps $(VENV)/.installed

# System packages the sandbox needs (Debian). Skipped when present; needs root otherwise.
system-deps:
	@bash scripts/system-deps.sh

$(VENV)/.installed: uv.lock pyproject.toml packages/server/pyproject.toml packages/client/pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	$(UV) sync --frozen --all-extras --compile-bytecode --python $(PYTHON)
	@# Our own packages are installed editable (their sources stay here): compile them too.
	@# Without .pyc files (and with PYTHONDONTWRITEBYTECODE set, as on some machines) every
	@# start of the server or the CLI compiles ~500 modules again: 2 s instead of 0.3 s.
	$(VENV)/bin/python -m compileall -q packages/server/src packages/client/src
	@touch $@

run: install
	$(VENV)/bin/python-executor-server serve

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check packages benchmarks
	$(VENV)/bin/ruff format --check packages benchmarks
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/python benchmarks/run.py

docker-image:
	bash deploy/build-sandbox-image.sh

clean:
	rm -rf $(VENV) data
