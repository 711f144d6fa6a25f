"""Start and stop the real peers the tests and benchmarks talk to.

Every server is started on a free loopback port, waited for until it answers, and stopped by
PID (SIGTERM, then SIGKILL).  Nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


#: Ports handed out by :func:`free_port`: below Linux's ephemeral range (32768-60999), so no
#: outgoing connection (storescu, a C-ECHO probe, an HTTP client) can take one between the check
#: and the server binding it, as it could a port from ``bind(0)``.  Split in one block per
#: pytest-xdist worker (``make test`` runs several), so two workers never get the same port.
PORT_RANGE = (12000, 32000)
PORT_BLOCKS = 8
_next_port: dict[str, int] = {}


def _port_block() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...; gw0 without xdist
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (PORT_RANGE[1] - PORT_RANGE[0]) // PORT_BLOCKS
    start = PORT_RANGE[0] + (index % PORT_BLOCKS) * size
    return start, size


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now and that no other call in this
    test run returns (see :data:`PORT_RANGE`).

    Each process walks its worker's block from a random start (another test run on the same
    machine starts elsewhere) and skips ports something is bound to.
    """
    start, size = _port_block()
    key = f"{os.getpid()}-{start}"
    offset = _next_port.setdefault(key, random.randrange(size))  # noqa: S311 - not cryptography
    for step in range(size):
        port = start + (offset + step) % size
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _next_port[key] = offset + step + 1
        return port
    raise RuntimeError(f"no free port in {start}-{start + size - 1}")


def child_processes(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/<pid>/task/*/children``; Linux)."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in children.read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (children, their children, ...)."""
    pids = [pid]
    for child in child_processes(pid):
        pids += process_tree(child)
    return pids


def wait_for_port(
    port: int, host: str = LOOPBACK, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process (group when it leads one), then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def tool_path(name: str) -> str | None:
    return shutil.which(name)


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    """Environment for DCMTK tools; ``TCP_NODELAY=1`` turns Nagle off (see docs/performance.md)."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


@dataclass
class Server:
    """A running peer: its process, port and working folder."""

    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_process(self.proc)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _spawn(
    args: Sequence[str], workdir: Path, log_name: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / log_name
    fh = log.open("wb")
    proc = subprocess.Popen(list(args), cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env=env)
    fh.close()
    return proc, log


def _on_a_free_port(start: Callable[[int], Server], attempts: int = 3) -> Server:
    """``start(port)`` on a :func:`free_port`; again on another if the server died before listening."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except RuntimeError:  # wait_for_port: the process exited (e.g. address already in use)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def start_storescp(
    workdir: Path,
    *,
    ae_title: str = "ARCHIVE",
    port: int | None = None,
    nodelay: bool = True,
    extra_args: Sequence[str] = (),
) -> Server:
    """DCMTK ``storescp`` accepting everything, writing files into ``workdir/received``."""
    if port is None:  # a port taken by someone else in the meantime: try the next one
        return _on_a_free_port(lambda p: start_storescp(workdir, ae_title=ae_title, port=p, nodelay=nodelay,
                                                        extra_args=extra_args))
    out = workdir / "received"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "storescp",
        "--aetitle",
        ae_title,
        "--output-directory",
        str(out),
        "--accept-all",
        "+xa",
        *extra_args,
        str(port),
    ]
    proc, log = _spawn(args, workdir, f"storescp-{port}.log", dcmtk_env(nodelay))
    wait_for_port(port, proc=proc)
    return Server(proc, port, workdir, log, {"received": str(out), "ae_title": ae_title})


def start_redis(workdir: Path, *, port: int | None = None) -> Server:
    """A throwaway ``redis-server`` (no persistence) on a free loopback port."""
    if port is None:
        return _on_a_free_port(lambda p: start_redis(workdir, port=p))
    args = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    proc, log = _spawn(args, workdir, f"redis-{port}.log")
    wait_for_port(port, proc=proc)
    return Server(proc, port, workdir, log, {"url": f"redis://{LOOPBACK}:{port}/0"})


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def run_tool(
    args: Sequence[str], *, timeout: float = 120.0, nodelay: bool = True, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK/dicom3tools command line and capture its output as text."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=dcmtk_env(nodelay))
    if check and result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    return result


def dciodvfy(path: Path | str) -> tuple[list[str], list[str], str]:
    """Run ``dciodvfy -new`` and return (errors, warnings, full output)."""
    res = run_tool(["dciodvfy", "-new", str(path)])
    text = res.stdout + res.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
    warnings = [ln for ln in text.splitlines() if ln.startswith("Warning")]
    return errors, warnings, text
