"""The package boundaries of docs/architecture.md, enforced: who may import whom."""

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


def test_import_linter_contracts_hold() -> None:
    """The layers and forbidden imports of pyproject.toml's [tool.importlinter] (every import, also
    those inside functions, ``if`` and ``try``) are kept."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True,
                         cwd=REPO, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_every_dicom_node_module_imports_without_torch() -> None:
    """Every module of dicom_node (found by walking the package, not a fixed list) imports in one
    interpreter without loading torch: the listener host may lack it.  Alembic's migration scripts
    and ``__main__`` run when imported; they are not modules to import."""
    code = (
        "import importlib, pkgutil, sys, dicom_node\n"
        "names = [m.name for m in pkgutil.walk_packages(dicom_node.__path__, 'dicom_node.')\n"
        "         if not m.name.endswith('__main__') and '.migrations.' not in m.name]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    count, torch_loaded = out.stdout.split()
    assert int(count) >= 30
    assert torch_loaded == "False"


def test_dicom_node_loads_no_module_by_name() -> None:
    """No ``importlib.import_module``/``__import__`` in dicom_node, so the import graph the contracts
    check is the whole graph."""
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "dicom_node").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if "import_module(" in line or "__import__(" in line
    ]
    assert found == []
