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
# The suite runs in 2 pytest-xdist processes, one test file each at a time (module fixtures such as
# a shared node stay in one process): most of an integration test is waiting on real processes.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: run test install install-test viewer lint typecheck bench clean

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

# Real viewer-side consumers for the tests: dcmjs + @cornerstonejs/adapters (npm ci, locked) and
# the built OHIF Viewer (npm pack @ohif/app, sha512 pinned in tests/support/ohif.py).  Without
# npm the tests that need them skip (and fail under DICOM_NODE_REQUIRE_TOOLS=1).
VIEWER_DIR = tests/viewer
$(VIEWER_DIR)/node_modules/.package-lock.json: $(VIEWER_DIR)/package.json $(VIEWER_DIR)/package-lock.json
	cd $(VIEWER_DIR) && npm ci --ignore-scripts --no-audit --no-fund

viewer: $(VENV)/.installed-test
	@if command -v npm >/dev/null; then \
		$(MAKE) --no-print-directory $(VIEWER_DIR)/node_modules/.package-lock.json && \
		PYTHONPATH=. $(PY) -m tests.support.ohif >/dev/null; \
	else echo "npm not found: the OHIF and dcmjs tests will skip"; fi

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

test: install-test viewer
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install-test
	$(VENV)/bin/ruff check dicom_node inference workers tests benchmarks

typecheck: install-test
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache $(VIEWER_DIR)/node_modules $(VIEWER_DIR)/ohif
