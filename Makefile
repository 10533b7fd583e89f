# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
SERVE_VENV ?= .venv-serve
DEV_VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint

# The serve environment has the `serve` extra only: no torch, as in the container.
$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet '.[serve]'
	touch $@

$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet --upgrade pip
	$(DEV_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m service --host $(HOST) --port $(PORT)

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .

test: lint
	$(DEV_VENV)/bin/python -m pytest
