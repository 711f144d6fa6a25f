"""A throwaway PostgreSQL for tests: Debian's ``initdb`` + ``pg_ctl`` on a free loopback port.

:func:`start_postgres` initialises a cluster in a fresh temporary folder, starts it (as a
non-root user: the server refuses to run as root) with durability off, and returns a
:class:`PostgresServer` that is stopped by PID.  When ``DICOM_NODE_TEST_POSTGRES_URL`` names an
already running server (a superuser, or a role allowed to create databases), that server is used
instead and nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.support.procs import LOOPBACK, free_port

#: Set this to use a running server instead of starting one.
URL_ENV = "DICOM_NODE_TEST_POSTGRES_URL"
#: The superuser role of a cluster started here (trust authentication, loopback only).
SUPERUSER = "dicom_node"
#: Account the server runs as when the tests run as root.
SERVICE_USER = "postgres"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here (and no ``DICOM_NODE_TEST_POSTGRES_URL``)."""


def postgres_bindir() -> Path | None:
    """Folder with ``initdb`` and ``pg_ctl``: the newest ``/usr/lib/postgresql/*/bin``, or PATH."""
    def version(p: Path) -> float:
        try:
            return float(p.parent.name)
        except ValueError:
            return 0.0

    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


@dataclass
class PostgresServer:
    """A PostgreSQL to test against: ``url`` reaches its maintenance database as a superuser."""

    url: str
    pid: int | None = None
    datadir: Path | None = None
    log: Path | None = None
    databases: list[str] = field(default_factory=list)

    def _admin(self) -> str:
        """The ``url`` in libpq form for psycopg (no ``+psycopg`` driver suffix)."""
        return make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its SQLAlchemy URL (``postgresql+psycopg://``)."""
        import psycopg
        from psycopg import sql

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not _DB_NAME.match(name):
            raise ValueError(f"database name must be a lower-case identifier, got {name!r}")
        with psycopg.connect(self._admin(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        url = make_url(self.url).set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    def drop_databases(self) -> None:
        """Drop every database made by :meth:`create_database` (kills lingering sessions)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._admin(), autocommit=True) as conn:
            for name in self.databases:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                conn.execute(drop.format(sql.Identifier(name)))
        self.databases.clear()

    def log_text(self) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop a server started here by PID (fast shutdown, then SIGKILL) and delete its files;
        on an external server, drop the databases created."""
        if self.pid is None:
            with contextlib.suppress(Exception):  # teardown of an external server: best effort
                self.drop_databases()
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # SIGINT = "fast" shutdown: ends sessions, no waiting
        if not _wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        if self.datadir is not None:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by someone else
            pass
        time.sleep(0.05)
    return False


def _run_as() -> list[str]:
    """Command prefix that drops root to :data:`SERVICE_USER` (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVICE_USER], check=True, capture_output=True)
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root without runuser: "
                                  "cannot start PostgreSQL as another user")
    return [runuser, "-u", SERVICE_USER, "--"]


def start_postgres(*, port: int | None = None, timeout: float = 60.0) -> PostgresServer:
    """Start a throwaway cluster (or use ``$DICOM_NODE_TEST_POSTGRES_URL``).

    Raises
    ------
    PostgresUnavailable
        Neither PostgreSQL binaries nor a server URL are available.
    """
    external = os.environ.get(URL_ENV)
    if external:
        return PostgresServer(url=external)
    bindir = postgres_bindir()
    if bindir is None:
        raise PostgresUnavailable(f"no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH, "
                                  f"and {URL_ENV} is not set")
    prefix = _run_as()
    # Under /tmp, not pytest's tmp_path: that one is private to root, and the server runs as
    # another user who must reach its data folder.
    base = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    datadir, log = base / "data", base / "postgres.log"
    if prefix:
        info = pwd.getpwnam(SERVICE_USER)
        os.chown(base, info.pw_uid, info.pw_gid)
    port = port or free_port()
    try:
        res = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(datadir), "-U", SUPERUSER,
                              "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        # Durability off: a test cluster is thrown away, and fsync dominates its run time.
        options = (f"-p {port} -c listen_addresses={LOOPBACK} -c unix_socket_directories={base} "
                   f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections=200")
        res = subprocess.run([*prefix, str(bindir / "pg_ctl"), "start", "-w",
                              "-t", str(int(timeout)), "-D", str(datadir), "-l", str(log),
                              "-o", options],
                             capture_output=True, text=True, timeout=timeout + 10)
        if res.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({res.returncode}): "
                               f"{res.stdout}\n{res.stderr}\n{text}")
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except BaseException:
        _stop_datadir(datadir)
        shutil.rmtree(base, ignore_errors=True)
        raise
    url = f"postgresql+psycopg://{SUPERUSER}@{LOOPBACK}:{port}/postgres"
    return PostgresServer(url=url, pid=pid, datadir=datadir, log=log)


def _stop_datadir(datadir: Path) -> None:
    """Kill whatever server a failed start may have left running in ``datadir``."""
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        os.kill(int((datadir / "postmaster.pid").read_text().splitlines()[0]), signal.SIGKILL)
