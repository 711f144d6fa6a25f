"""The catalog's schema, kept current by Alembic: :func:`upgrade_schema` runs at every start.

The migration scripts live inside the package (``dicom_node/migrations``), so no
``alembic.ini`` is needed at run time.  ``serve`` and every worker call :func:`upgrade_schema`
as they start, often at the same moment: a PostgreSQL advisory lock (or an ``fcntl`` lock file
next to a SQLite database) lets exactly one of them migrate while the others wait and then find
the schema current.  A database made by ``create_all`` before migrations existed is adopted
without touching its rows: stamped at the head when its tables already match
``Base.metadata``, else at :data:`BASELINE` and upgraded from there.

Write a new revision after changing :mod:`dicom_node.catalog`::

    python -m dicom_node.catalog.schema revision "add jobs.worker"
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from dicom_node.errors import DicomNodeError, TransientError

log = structlog.get_logger(__name__)

#: Where the Alembic environment and revisions live (inside the installed package).
MIGRATIONS = Path(__file__).resolve().with_name("migrations")
#: The revision equal to what ``Base.metadata.create_all`` built before migrations existed.
BASELINE = "0001"
#: Key of the PostgreSQL advisory lock that serialises migrations ("dicomnod" in ASCII).
PG_LOCK_KEY = 0x6469636F6D6E6F64
#: Tables whose presence without ``alembic_version`` marks a pre-migration database.
_CATALOG_TABLES = frozenset({"series", "instances", "jobs", "job_events", "deliveries"})


class SchemaError(DicomNodeError):
    """The database schema cannot be brought to the version this dicom-node expects."""


class DatabaseUnavailableError(TransientError):
    """The database did not answer (not started yet, wrong host, refused credentials)."""


def _masked(url: str) -> str:
    """The URL with its password hidden, fit for an error message or a log line."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # any parse failure: show a placeholder rather than the raw URL
        return "<unparsable database URL>"


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic ``Config`` on the packaged scripts, bound to ``connection`` (or ``url``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def script_directory() -> ScriptDirectory:
    """The packaged revision scripts (parsed once: they never change while the process runs)."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this version of dicom-node knows."""
    heads = script_directory().get_heads()
    if len(heads) != 1:
        raise SchemaError(f"the packaged migrations have {len(heads)} heads {sorted(heads)}; "
                          f"merge them")
    return heads[0]


def _current(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


def current_revision(url: str, *, engine: Engine | None = None) -> str | None:
    """The revision the database at ``url`` is at (None: never migrated)."""
    own = engine is None
    eng = engine if engine is not None else _engine(url)
    try:
        with _connect(eng, url) as conn:
            heads = _current(conn)
    finally:
        if own:
            eng.dispose()
    return heads[0] if heads else None


def _engine(url: str) -> Engine:
    """A short-lived engine for the migration (no pool: it runs once per process)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
    return create_engine(url, poolclass=NullPool)


@contextlib.contextmanager
def _connect(engine: Engine, url: str, *, begin: bool = False) -> Iterator[Connection]:
    """A connection (in a transaction committed on exit when ``begin``)."""
    try:
        conn = engine.connect()
    except OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot reach the database {_masked(url)}: {exc.orig}") from exc
    with conn:
        if not begin:
            yield conn
            return
        with conn.begin():
            yield conn


def _check_known(heads: Sequence[str], url: str) -> None:
    """Refuse a database migrated by a newer dicom-node: this code would misread its tables."""
    for rev in heads:
        try:
            script_directory().get_revision(rev)
        except (RevisionError, CommandError):
            raise SchemaError(
                f"the database {_masked(url)} is at schema revision {rev!r}, which this "
                f"dicom-node does not know (newest known: {head_revision()!r}); upgrade "
                f"dicom-node on this host"
            ) from None


@contextlib.contextmanager
def _sqlite_file_lock(database: str | None) -> Iterator[None]:
    if not database or database == ":memory:":
        # Nobody else can see an in-memory database.
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".schema-lock")
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _matches_metadata(conn: Connection) -> bool:
    """True when the tables already are what the newest revision builds (create_all by this
    very version); otherwise a create_all database is taken to be at :data:`BASELINE`."""
    from dicom_node.catalog.tables import Base  # here: the catalog imports this module

    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return not compare_metadata(ctx, Base.metadata)


def _quiet_alembic() -> None:
    """Alembic logs a dozen INFO lines per run (plugins, context); ``schema_upgraded`` says it
    in one.  An explicitly configured level is left alone."""
    logger = logging.getLogger("alembic")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def upgrade_schema(url: str, *, engine: Engine | None = None, revision: str = "head") -> None:
    """Bring the catalog database at ``url`` to ``revision`` (default: the newest).

    Safe to call from several processes at once.  ``engine`` lets the caller pass its own
    (so SQLite pragmas apply, and an in-memory database is the one it uses).

    Raises
    ------
    SchemaError
        The database is at a revision this code does not know (migrated by a newer version).
    DatabaseUnavailableError
        The database could not be reached.
    """
    own = engine is None
    eng = engine if engine is not None else _engine(url)
    try:
        target = head_revision() if revision == "head" else revision
        # Fast path, no lock: at every start after the first the schema is already current.
        with _connect(eng, url) as conn:
            heads = _current(conn)
        _check_known(heads, url)
        if heads == (target,):
            return
        backend = eng.dialect.name
        lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if backend == "sqlite":
            lock = _sqlite_file_lock(make_url(url).database)
        with lock, _connect(eng, url, begin=True) as conn:
            if backend == "postgresql":
                # Held until this transaction commits: the migration and the version row go
                # in together, and a waiting process then sees the new revision.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            heads = _current(conn)  # again, under the lock: another process may have migrated
            _check_known(heads, url)
            if heads == (target,):
                return
            cfg = alembic_config(conn)
            _quiet_alembic()
            present = _CATALOG_TABLES & set(inspect(conn).get_table_names()) if not heads else set()
            if present and present != _CATALOG_TABLES:
                raise SchemaError(
                    f"the database {_masked(url)} has only some catalog tables "
                    f"({', '.join(sorted(present))}) and no migration history; restore it or "
                    f"point database.url at an empty database"
                )
            if present:
                adopted = head_revision() if _matches_metadata(conn) else BASELINE
                command.stamp(cfg, adopted)
                log.info("schema_adopted", database=_masked(url), revision=adopted)
                heads = (adopted,)
                if adopted == target:
                    return
            command.upgrade(cfg, target)
            log.info("schema_upgraded", database=_masked(url),
                     from_revision=heads[0] if heads else None, to_revision=target)
    finally:
        if own:
            eng.dispose()


def new_revision(message: str, *, rev_id: str | None = None) -> Path:
    """Autogenerate a revision for whatever ``Base.metadata`` has that the head does not.

    Diffs against a scratch SQLite database at the current head; read the result, since
    autogenerate misses renames and server defaults.
    """
    numbers = [int(s.revision) for s in script_directory().walk_revisions() if s.revision.isdigit()]
    rev_id = rev_id or f"{max(numbers, default=0) + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'head.db'}"
        upgrade_schema(url)
        engine = _engine(url)
        try:
            with engine.begin() as conn:
                script = command.revision(alembic_config(conn), message=message, autogenerate=True,
                                          rev_id=rev_id)
        finally:
            engine.dispose()
    if script is None or isinstance(script, list):
        raise SchemaError(f"alembic wrote no single revision for {message!r}")
    return Path(script.path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dicom_node.catalog.schema upgrade URL`` / ``revision MESSAGE``."""
    parser = argparse.ArgumentParser(prog="python -m dicom_node.catalog.schema", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="migrate a database to the newest revision")
    up.add_argument("url")
    rev = sub.add_parser("revision", help="autogenerate a new revision from dicom_node.catalog")
    rev.add_argument("message")
    args = parser.parse_args(argv)
    try:
        if args.command == "upgrade":
            upgrade_schema(args.url)
            print(f"{_masked(args.url)} is at revision {head_revision()}")
        else:
            print(new_revision(args.message))
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
