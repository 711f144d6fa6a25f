# dicom-node: two commands.  `make run` installs only what the node needs (torch's CPU wheel
# included) and starts it on the embedded defaults; `make test` adds the test toolchain and runs
# the whole suite.  Both create/update .venv first.
PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= config/dicom-node.toml
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check
# torch is pinned to the small CPU wheel on the test/CI path; pyproject keeps a range for users.
CONSTRAINTS = -c constraints.txt
PYTEST_ARGS ?=

.PHONY: run test install install-test lint typecheck bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# What the node runs with: its dependencies and the worker extra (torch).
$(VENV)/.installed-run: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -q $(CONSTRAINTS) -e '.[worker]'
	touch $@

# Plus the test toolchain (pytest, playwright, dcmqi, mypy, ruff, ...).
$(VENV)/.installed-test: $(VENV)/.installed-run
	$(PIP) install -q $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(VENV)/.installed-run

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-test
	$(VENV)/bin/ruff check dicom_node inference workers tests benchmarks

typecheck: install-test
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
