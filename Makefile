# Developer entry points; each bootstraps .venv first, so they work on a fresh clone.

SHELL := /bin/sh
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

# python3.11 where installed (the image's version), else python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements.txt requirements-dev.txt pyproject.toml
# The suite mostly waits on subprocesses and sockets: on 2 quiet cores 6 workers take 3.2-3.8 min.
TEST_WORKERS ?= 6

# The stamp is named after the requirements' checksum: a changed pin reinstalls, a touched file does not.
REQ_HASH := $(shell cat $(REQUIREMENTS) | cksum | cut -d ' ' -f 1)
STAMP := $(VENV)/.requirements-$(REQ_HASH).stamp

.PHONY: help venv demo test lint

help:
	@echo "make demo   run the Replicate simulator and the service locally"
	@echo "make test   run the test suite"
	@echo "make lint   ruff check, mypy (strict), hadolint Dockerfile"

venv: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: $(PYTHON) is older than 3.11; run: make PYTHON=/path/to/python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	$(PY) -m pip install --disable-pip-version-check --quiet -r requirements-dev.txt -e .
	@rm -f $(VENV)/.requirements-*.stamp
	@touch $@

demo: $(STAMP)
	$(PY) -m replicate_generation demo

# loadgroup: a module marked xdist_group builds its costly session fixture on one worker only.
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
