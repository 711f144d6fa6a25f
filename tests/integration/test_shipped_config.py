"""`make run`'s configuration, config/dicom-node.toml, starts a node that answers C-ECHO and /healthz."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support import procs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
#: Tool caches in the work tree that other tests write while this one runs (``make test`` runs
#: two test files at a time: mypy's cache is SQLite files); no node data can land there.
TOOL_CACHES = frozenset({".mypy_cache", ".ruff_cache", ".pytest_cache", ".import_linter_cache", ".hypothesis"})


def _repo_databases_and_config() -> set[Path]:
    """Every ``*.db`` of the work tree outside the tool caches, and everything under config/."""
    databases = {p for p in REPO.rglob("*.db") if TOOL_CACHES.isdisjoint(p.relative_to(REPO).parts)}
    return databases | set((REPO / "config").rglob("*"))


def test_shipped_config_serves_echo(tmp_path: Path) -> None:
    """`dicom-node serve --config config/dicom-node.toml` (paths and ports moved by environment
    overrides) accepts an association from DCMTK echoscu, answers /healthz and stops cleanly on SIGTERM."""
    require_tool("echoscu")
    port, web_port = procs.free_port(), procs.free_port()
    env = {
        **os.environ,
        "DICOM_NODE_LISTENER__PORT": str(port),
        "DICOM_NODE_STORAGE__ROOT": str(tmp_path / "spool"),
        "DICOM_NODE_DATABASE__URL": f"sqlite:///{tmp_path / 'node.db'}",
        "DICOM_NODE_BROKER__URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "DICOM_NODE_WEB__PORT": str(web_port),
    }
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "serve",
            "--config",
            str(REPO / "config" / "dicom-node.toml"),
            "--log-format",
            "json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        procs.wait_for_port(port, timeout=60, proc=proc)
        res = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port)])
        assert res.returncode == 0, res.stdout + res.stderr
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/healthz", timeout=10) as reply:
            assert reply.status == 200
    finally:
        procs.stop_process(proc, timeout=30)
    assert proc.returncode == 0, (tmp_path / "node.log").read_text()
    assert '"event": "node_stopped"' in (tmp_path / "node.log").read_text()


def test_shipped_config_keeps_its_data_outside_the_repository(tmp_path: Path) -> None:
    """With nothing overridden but the ports, `make run`'s node keeps its spool, catalog and broker
    under ``~/.local/share/dicom-node`` (here a scratch HOME), never in the git work tree."""
    require_tool("echoscu")
    home = tmp_path / "home"
    home.mkdir()
    port, web_port = procs.free_port(), procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update(HOME=str(home), DICOM_NODE_LISTENER__PORT=str(port), DICOM_NODE_WEB__PORT=str(web_port))
    before = _repo_databases_and_config()
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(REPO / "config" / "dicom-node.toml")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    try:
        procs.wait_for_port(port, timeout=60, proc=proc)
        res = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port)])
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        procs.stop_process(proc, timeout=30)
    data = home / ".local" / "share" / "dicom-node"
    assert (data / "dicom-node.db").is_file() and (data / "spool").is_dir(), (tmp_path / "node.log").read_text()
    assert _repo_databases_and_config() == before
