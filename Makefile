# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
SERVE_VENV ?= .venv-serve
DEV_VENV ?= .venv

.PHONY: serve test lint system-packages

# The serve environment has the `serve` extra only: no torch, as in the container. Editable,
# as the dev one: its emotion-detect ran the copy installed at first, the server the checkout
# (and on the Makefile too, so that an environment installed the old way is installed again).
$(SERVE_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet -e '.[serve]'
	touch $@

$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet --upgrade pip
	$(DEV_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# HOST and PORT given on make's command line (make serve PORT=9000) win over EMOTION_HOST
# and EMOTION_PORT; from the environment they do not count (tcsh exports HOST, the machine's
# name), nor given empty (PORT=). Otherwise those settings, or the service's own
# 127.0.0.1:8000.
given = $(if $(and $(filter command line,$(origin $(1))),$($(1))),$(2) $($(1)))

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m service $(call given,HOST,--host) $(call given,PORT,--port)

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .

# What the tests drive from Debian: nginx in front of replicas, and headless Chromium for
# the page (Playwright uses this binary; no browser is downloaded). Installed only when
# missing, as root or through sudo.
system-packages:
	@missing=""; command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: lint system-packages
	$(DEV_VENV)/bin/python -m pytest --durations=10
