# Two commands do everything on a fresh machine: `make repro` and `make test`.
# The venv's bin comes first on PATH so that dvc stage commands run the venv's python.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install repro test test-gpu bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes: a second `make` on a machine with .venv takes seconds.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

repro: install
	@test -d .git || { echo "error: DVC needs a git repository (run from a git clone)" >&2; exit 2; }
	dvc config core.analytics false
	dvc repro

test: install
	python -m pytest

test-gpu: install
	python -m pytest -m gpu

bench: install
	python bench/synthetic.py
	python bench/sampler.py

clean:
	rm -rf $(VENV)
