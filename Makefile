# dicom-node: two commands.  `make run` starts a node on the embedded defaults,
# `make test` runs the whole suite.  Both create/update .venv first.
PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= config/dicom-node.toml
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check
# torch is pinned to the small CPU wheel on the test/CI path; pyproject keeps a range for users.
CONSTRAINTS = -c constraints.txt
PYTEST_ARGS ?=

.PHONY: run test install lint typecheck bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -q $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check dicom_node inference workers tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
