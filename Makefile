# Developer entry points. Each target bootstraps .venv first (created if missing, requirements
# installed once per version of the requirements files), so they work on a fresh clone.
#   make demo   simulator + service on this machine, no token and no network needed
#   make test   the test suite
#   make lint   ruff, mypy, hadolint

SHELL := /bin/sh
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

# The interpreter that creates .venv: python3.11 where installed (the image's version), else python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements.txt requirements-dev.txt pyproject.toml

# The install stamp is named after a checksum of the requirements files and pyproject.toml, so
# editing a pin or an entry point triggers a reinstall while a second run, a fresh checkout or a touched file does not.
# (cksum is POSIX: present on every Linux and macOS.)
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

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
