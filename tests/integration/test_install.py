"""The production install of docs/install.md: the systemd units, the wheel, a fresh virtualenv,
the shipped production configuration, schema upgrades, a node that serves and stops."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support import procs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
UNITS = ("dicom-node.service", "dicom-node-worker.service")
#: Where docs/install.md puts the virtualenv; the test points the units at its own.
INSTALL_VENV = "/opt/dicom-node/venv"


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_verify_cleanly(tmp_path: Path, unit: str) -> None:
    """``systemd-analyze verify`` accepts each unit without a warning (an unknown key only warns)."""
    require_tool("systemd-analyze")
    text = (REPO / "config" / "systemd" / unit).read_text()
    assert f"{INSTALL_VENV}/bin/dicom-node" in text
    local = tmp_path / unit
    local.write_text(text.replace(INSTALL_VENV, sys.prefix))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    for needed in ("User=dicom-node", "LimitNOFILE=", "Restart=on-failure", "StateDirectory=dicom-node",
                   "UMask=0027"):
        assert needed in text, f"{unit} lacks {needed}"
    if unit == "dicom-node-worker.service":
        assert "KillMode=control-group" in text  # the pool children end with the unit


def _build_wheel(tmp_path: Path) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for package in ("dicom_node", "inference", "workers"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("dicom_node-*.whl")
    return wheel


def _production_config(tmp_path: Path, state: Path, port: int, web_port: int) -> Path:
    """config/production.toml with /var/lib/dicom-node moved to ``state`` and free ports."""
    text = (REPO / "config" / "production.toml").read_text()
    text = text.replace("/var/lib/dicom-node", str(state)).replace("port = 11112", f"port = {port}")
    text = text.replace("port = 8080", f"port = {web_port}").replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
    tomllib.loads(text)
    path = tmp_path / "etc" / "dicom-node.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_serves_the_production_config(tmp_path: Path) -> None:
    """The wheel carries the package data and no test fixtures; installed into a new virtualenv it
    checks and upgrades the production configuration's catalog, serves C-ECHO and /healthz from
    outside the repository, and stops cleanly on SIGTERM."""
    require_tool("echoscu")
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dicom_node/catalog/migrations/script.py.mako" in names
    assert any(n.startswith("dicom_node/web/templates/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "dicom_node/testing/"))]

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    # The dependencies come from the test's own environment (no download), appended to the new
    # environment's path by a .pth file; the package itself from the wheel only (the test
    # environment's editable finder is a .pth file of its own, which a path entry does not run).
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    python = env_dir / "bin" / "python"
    (target / "test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_") and k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import dicom_node; print(dicom_node.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert where.stdout.strip().startswith(str(target)), where.stdout

    state = tmp_path / "var-lib-dicom-node"
    port, web_port = procs.free_port(), procs.free_port()
    config = _production_config(tmp_path, state, port, web_port)

    def node(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-m", "dicom_node", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120, check=False)

    checked = node("config", "check", "--config", str(config))
    assert checked.returncode == 0 and "configuration OK" in checked.stdout, checked.stdout + checked.stderr
    db = f"sqlite:///{state / 'dicom-node.db'}"
    state.mkdir()
    for _ in range(2):  # an upgrade applies the migrations; a second one finds nothing to do
        upgraded = subprocess.run([str(python), "-m", "dicom_node.catalog.schema", "upgrade", db],
                                  capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr

    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(python), "-m", "dicom_node", "serve", "--config", str(config), "--log-format",
                             "json"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        procs.wait_for_port(port, timeout=90, proc=proc)
        echo = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port)])
        assert echo.returncode == 0, echo.stdout + echo.stderr
        import urllib.request

        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/healthz", timeout=10) as reply:
            assert reply.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        procs.stop_process(proc, timeout=30)
    text = (tmp_path / "serve.log").read_text()
    assert '"event": "node_stopped"' in text, text[-3000:]
    assert (state / "spool").is_dir() and (state / "dicom-node.db").is_file()
