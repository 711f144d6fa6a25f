"""Alembic migrations on SQLite: the migrated schema is ``Base.metadata``, adoption, concurrency.

The same checks run against a real PostgreSQL in ``tests/integration/test_scale_out.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from dicom_node.catalog import Base, Catalog, JobSpec
from dicom_node.catalog.schema import (
    BASELINE,
    DatabaseUnavailableError,
    SchemaError,
    alembic_config,
    current_revision,
    head_revision,
    script_directory,
    upgrade_schema,
)
from dicom_node.ingest.events import StoredInstance
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[2]


def schema_diff(engine: Engine) -> list[object]:
    """What alembic autogenerate would still have to do to reach ``Base.metadata`` (types too)."""
    with engine.connect() as conn:
        opts = {"compare_type": True, "compare_server_default": True}
        ctx = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(ctx, Base.metadata))


def concurrent_upgrades(url: str, processes: int, cwd: Path) -> list[str]:
    """Start ``processes`` Pythons that all call ``upgrade_schema(url)`` at the same instant;
    return each one's output (they fail the test if any exits non-zero)."""
    go = cwd / "go"
    code = textwrap.dedent(f"""
        import os, sys, time
        from dicom_node.catalog.schema import upgrade_schema
        while not os.path.exists({str(go)!r}):
            time.sleep(0.002)
        upgrade_schema({url!r})
        print("upgrade returned")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(processes)]
    time.sleep(1.5)  # every interpreter has imported alembic and is spinning on the go file
    go.touch()
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        outputs.append(out)
    return outputs


def version_rows(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'catalog.db'}"


def assert_upgrade_builds_the_models(url: str) -> None:
    """Upgrade the empty database at ``url`` and check it equals ``Base.metadata`` at head."""
    upgrade_schema(url)
    engine = create_engine(url)
    try:
        assert schema_diff(engine) == []
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert version_rows(engine) == [head_revision()]
    finally:
        engine.dispose()


def test_migrated_schema_equals_metadata(url: str) -> None:
    """Upgrading an empty SQLite database to head builds exactly the tables, columns, types,
    indexes and constraints of ``dicom_node.catalog.Base.metadata`` (fails when a model
    change has no migration)."""
    assert_upgrade_builds_the_models(url)


def test_revisions_form_one_line_from_the_baseline() -> None:
    """The packaged revisions have a single head and start at the baseline revision."""
    scripts = script_directory()
    assert len(scripts.get_heads()) == 1
    assert list(scripts.get_bases()) == [BASELINE]
    assert scripts.get_revision(BASELINE).down_revision is None


def test_upgrade_again_is_a_cheap_no_op(url: str) -> None:
    """A second upgrade of a current database changes nothing and takes well under 0.1 s
    (it runs at every start of serve and of each worker)."""
    upgrade_schema(url)
    started = time.perf_counter()
    upgrade_schema(url)
    elapsed = time.perf_counter() - started
    engine = create_engine(url)
    try:
        assert version_rows(engine) == [head_revision()]
    finally:
        engine.dispose()
    assert elapsed < 0.1, f"no-op upgrade took {elapsed:.3f} s"


def test_catalog_runs_on_the_migrated_schema(url: str) -> None:
    """The catalog records instances and creates jobs on a database built by the migrations
    (not by create_all)."""
    upgrade_schema(url)
    catalog = Catalog(url, create=False)
    try:
        inst = StoredInstance("1.2.3", "1.2.3.4", "1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2",
                              "1.2.840.10008.1.2.1", Path("/spool/1.dcm"), 100, "CT1", "a1",
                              time.time(), {"Modality": "CT"})
        catalog.record_instances([inst])
        ids = catalog.create_jobs([JobSpec("1.2.3.4", "ct", "ct-tissue", ["archive"])])
        assert len(ids) == 1
        assert [d.destination for d in catalog.deliveries(ids[0])] == ["archive"]
        assert catalog.create_jobs([JobSpec("1.2.3.4", "ct", "ct-tissue", ["archive"])]) == []
    finally:
        catalog.close()


def insert_series(engine: Engine, instance_count: int) -> None:
    with engine.begin() as conn:
        conn.execute(Base.metadata.tables["series"].insert().values(
            series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", instance_count=instance_count,
            bytes_received=0, first_received_at=1.0, last_received_at=2.0, state="complete",
            generation=1))


def test_create_all_database_of_this_version_is_stamped_at_head(url: str) -> None:
    """A database made by this version's create_all (no migration history) is stamped at the
    head without running any revision, keeping its rows."""
    Path(url.split("///", 1)[1]).parent.mkdir(parents=True)
    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
        insert_series(engine, 7)
        assert current_revision(url) is None
        upgrade_schema(url)
        assert current_revision(url) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT instance_count FROM series")).scalar_one() == 7
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_pre_migration_database_is_adopted_at_baseline_and_upgraded(url: str) -> None:
    """A database with the first release's tables and no migration history (what create_all
    made before migrations existed) is stamped at the baseline, upgraded to head, rows kept."""
    upgrade_schema(url, revision=BASELINE)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
        insert_series(engine, 9)
        upgrade_schema(url)
        assert current_revision(url) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT instance_count FROM series")).scalar_one() == 9
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_database_from_a_newer_release_is_refused(url: str) -> None:
    """A database at a revision this code does not know stops the start with a sentence naming
    the revision, instead of running on tables it would misread."""
    upgrade_schema(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0999_future'"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match=r"revision '0999_future'.*upgrade dicom-node on this"):
        upgrade_schema(url)


def test_some_catalog_tables_without_history_are_refused(url: str) -> None:
    """A database holding only some catalog tables and no migration history is refused by name
    rather than half-migrated."""
    Path(url.split("///", 1)[1]).parent.mkdir(parents=True)
    engine = create_engine(url)
    try:
        Base.metadata.tables["series"].create(engine)
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match=r"only some catalog tables \(series\)"):
        upgrade_schema(url)


def test_downgrade_to_base_and_upgrade_again(url: str) -> None:
    """Every revision can be undone: downgrading to base leaves only alembic's own table, and
    upgrading again rebuilds the full schema."""
    upgrade_schema(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert current_revision(url) is None
        upgrade_schema(url)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_concurrent_starts_migrate_once(url: str, tmp_path: Path) -> None:
    """Four processes upgrading the same fresh SQLite file at the same instant all succeed, and
    exactly one of them runs the migration (the lock file serialises them)."""
    outputs = concurrent_upgrades(url, 4, tmp_path)
    assert all("upgrade returned" in out for out in outputs)
    assert sum(out.count("schema_upgraded") for out in outputs) == 1, outputs
    engine = create_engine(url)
    try:
        assert version_rows(engine) == [head_revision()]
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_unreachable_database_is_a_transient_error() -> None:
    """A PostgreSQL URL nobody listens on raises DatabaseUnavailableError naming the host and
    port, with the password hidden."""
    port = free_port()
    with pytest.raises(DatabaseUnavailableError, match=rf"127\.0\.0\.1:{port}/catalog") as info:
        upgrade_schema(f"postgresql+psycopg://node:s3cret@127.0.0.1:{port}/catalog")
    assert "s3cret" not in str(info.value)
