"""House style enforced: ruff (commented ignore list in pyproject.toml) and mypy --strict on package code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ruff_is_clean() -> None:
    """`ruff check` finds nothing in the packages, tests and benchmarks."""
    res = subprocess.run([str(BIN / "ruff"), "check", "dicom_node", "inference", "workers", "tests", "benchmarks"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_is_clean() -> None:
    """`mypy --strict` (configured in pyproject.toml) finds no error in dicom_node, inference, workers."""
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
