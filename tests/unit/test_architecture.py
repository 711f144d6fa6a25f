"""The package boundaries of DESIGN.md, enforced: who may import whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules imported by a file (only module-level statements when ``top_level_only``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks are fine
            continue
    return found


def offenders(package: str, forbidden: tuple[str, ...], *, top_level_only: bool) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for mod in imports(path, top_level_only=top_level_only):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO)} imports {mod}")
    return bad


def test_inference_knows_no_dicom() -> None:
    """inference/ imports numpy and torch only: no pydicom, pynetdicom, highdicom, celery or dicom_node."""
    assert offenders("inference", ("pydicom", "pynetdicom", "highdicom", "celery", "sqlalchemy", "dicom_node",
                                   "workers"), top_level_only=False) == []


def test_dicom_node_does_not_import_torch_or_tasks_at_import_time() -> None:
    """dicom_node/ never imports torch at module level, nor the Celery tasks anywhere."""
    assert offenders("dicom_node", ("torch",), top_level_only=True) == []
    assert offenders("dicom_node", ("workers.tasks", "workers.pipeline"), top_level_only=False) == []


def test_listener_host_runs_without_torch() -> None:
    """Importing everything `dicom-node serve` needs does not load torch (the listener host may lack it)."""
    code = ("import sys, dicom_node.cli, dicom_node.node, dicom_node.ingest.listener, dicom_node.delivery.dicom, "
            "dicom_node.scheduling.completion, workers.app; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
