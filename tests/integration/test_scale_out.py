"""Scale-out mode with real processes: PostgreSQL catalog, Redis broker, two separate workers.

A throwaway PostgreSQL (Debian's ``initdb``/``pg_ctl``, or ``$DICOM_NODE_TEST_POSTGRES_URL``)
carries the migration checks of ``tests/unit/test_migrations.py`` over to PostgreSQL, and the
catalog of a ``dicom-node serve`` (no in-process worker) whose jobs are taken by two
``dicom-node worker`` processes, as on two GPU hosts.
"""

from __future__ import annotations

import base64
import functools
import json
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import create_engine, text

from dicom_node.catalog import Base, Catalog, JobRow
from dicom_node.catalog.schema import BASELINE, current_revision, head_revision, upgrade_schema
from dicom_node.demo import (
    ChestSpec,
    Phantom,
    SeriesInfo,
    make_chest_phantom,
    slice_datasets,
    write_datasets,
)
from dicom_node.settings import load_settings
from tests.conftest import require_postgres, require_tool
from tests.integration.test_end_to_end import SEG_CLASS, SR_CLASS, archived, storescu
from tests.support import procs
from tests.support.node import NodeProcess, node_config, start_node, wait_until
from tests.support.postgres import PostgresServer
from tests.unit.test_migrations import assert_upgrade_builds_the_models, concurrent_upgrades, schema_diff, version_rows

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKERS = ("gpu1", "gpu2")
N_SERIES = 4


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the module (about 1 s to start); each test takes a fresh database."""
    server = require_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database(postgres: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of an empty database, dropped after the test."""
    yield postgres.create_database()
    postgres.drop_databases()


def test_postgres_migrated_schema_equals_metadata(database: str) -> None:
    """On PostgreSQL too, upgrading an empty database builds exactly ``Base.metadata`` (types,
    indexes, unique constraints, foreign keys), at the head revision."""
    assert_upgrade_builds_the_models(database)


def test_postgres_concurrent_starts_migrate_once(database: str, tmp_path: Path) -> None:
    """Four processes upgrading the same empty PostgreSQL database at once all succeed and the
    advisory lock lets exactly one of them migrate."""
    outputs = concurrent_upgrades(database, 4, tmp_path)
    assert sum(out.count("schema_upgraded") for out in outputs) == 1, outputs
    engine = create_engine(database)
    try:
        assert version_rows(engine) == [head_revision()]
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_postgres_pre_migration_database_is_adopted(database: str) -> None:
    """A PostgreSQL catalog with the first release's tables and no migration history is stamped
    at the baseline and upgraded to head in place, keeping its rows."""
    upgrade_schema(database, revision=BASELINE)
    engine = create_engine(database)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
            conn.execute(Base.metadata.tables["series"].insert().values(
                series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", instance_count=5,
                bytes_received=0, first_received_at=1.0, last_received_at=2.0, state="complete",
                generation=1))
        upgrade_schema(database)
        assert current_revision(database) == head_revision()
        assert schema_diff(engine) == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT instance_count FROM series")).scalar_one() == 5
    finally:
        engine.dispose()


def encoded_by(node: NodeProcess) -> dict[str, list[int]]:
    """Job ids each worker encoded, from the ``job_encoded`` lines of its JSON log."""
    out: dict[str, list[int]] = {}
    for name in WORKERS:
        log = node.config_path.parent / f"worker-{name}.log"
        jobs = out.setdefault(name, [])
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "job_encoded":
                jobs.append(int(record["job_id"]))
    return out


def worker_ready(node: NodeProcess, name: str) -> bool:
    log = node.config_path.parent / f"worker-{name}.log"
    return log.exists() and f"{name}@" in log.read_text(errors="replace") and \
        " ready." in log.read_text(errors="replace")


def referenced_series(ds: pydicom.Dataset) -> str:
    """The source series a SEG or SR result was made from."""
    if str(ds.SOPClassUID) == SEG_CLASS:
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    return str(evidence.ReferencedSeriesSequence[0].SeriesInstanceUID)


def segment_volumes_ml(path: str, voxel_ml: float) -> dict[str, float]:
    """Volume of every segment of a SEG file, by lower-case segment label."""
    seg = hd.seg.segread(path)
    pixels = seg.pixel_array
    if pixels.ndim == 3:  # a single segment comes back as (frames, rows, columns)
        pixels = pixels[..., None]
    out = {}
    for number in seg.segment_numbers:
        frames = [i for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
                  if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number]
        label = str(seg.get_segment_description(number).segment_label).lower()
        out[label] = float(pixels[frames].astype(bool).sum()) * voxel_ml
    return out


def check_against_phantom(got: dict[str, list[pydicom.Dataset]], series_uid: str, phantom: Phantom,
                          dciodvfy_clean: object) -> None:
    """The series' SEG and SR pass dciodvfy, and the SEG's lung and body volumes match the
    phantom's voxel masks within 3 % (the analytic volumes assume the whole chest, and a
    12-slice phantom cuts the lungs)."""
    mine = [ds for dss in got.values() for ds in dss if referenced_series(ds) == series_uid]
    for ds in mine:
        dciodvfy_clean(ds.filename)  # type: ignore[operator]
    seg = next(ds for ds in mine if str(ds.SOPClassUID) == SEG_CLASS)
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    volumes = segment_volumes_ml(seg.filename, voxel_ml)
    lungs = next(v for k, v in volumes.items() if "lung" in k)
    body = next(v for k, v in volumes.items() if "body" in k)
    assert lungs == pytest.approx(phantom.masks["lungs"].sum() * voxel_ml, rel=0.03), volumes
    assert body == pytest.approx(phantom.masks["body"].sum() * voxel_ml, rel=0.03), volumes


@pytest.mark.slow
def test_two_workers_share_series_and_each_result_arrives_once(
    tmp_path: Path, database: str, redis_server: procs.Server, storescp_archive: procs.Server,
    dciodvfy_clean: object,
) -> None:
    """With PostgreSQL + Redis, `serve` without an in-process worker and two separate workers,
    four CT series sent in one association are processed by both workers (each job encoded
    exactly once), and the archive holds exactly one SEG and one SR per series, with the
    phantom's lung and body volumes, and no object stored twice."""
    phantoms: dict[str, Phantom] = {}
    files: list[Path] = []
    for i in range(N_SERIES):
        phantom = make_chest_phantom(ChestSpec(slices=12, seed=i))
        info = SeriesInfo(seed=f"scale-out-{i}")
        phantoms[info.uid("series")] = phantom
        datasets = slice_datasets(phantom.hu, phantom.affine, info)
        files += write_datasets(datasets, tmp_path / f"ct{i}")

    workdir = tmp_path / "node"
    archive = {"name": "archive", "ae_title": storescp_archive.extra["ae_title"],
               "host": procs.LOOPBACK, "port": storescp_archive.port,
               "outputs": ["seg", "sr"]}  # the test counts SEG + SR per series
    rules = [{"name": "all-ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"],
              "destinations": ["archive"]}]
    config = node_config(workdir, broker_url=redis_server.extra["url"], destinations=[archive],
                         rules=rules, worker={"in_process": "no"}, database={"url": database})
    node = start_node(workdir, config)
    try:
        for name in WORKERS:
            node.start_worker(name)
        for name in WORKERS:
            try:
                wait_until(functools.partial(worker_ready, node, name), 90,
                           what=f"worker {name} ready")
            except TimeoutError:
                pytest.fail(f"worker {name} did not start; logs:\n{node.logs()[-6000:]}")

        # One association: every series is complete at its release (ImagesInAcquisition), so
        # all four jobs are queued together while both workers wait.
        storescu(node.port, files)

        def results_in() -> dict[str, list[pydicom.Dataset]] | None:
            got = archived(storescp_archive)
            counts = [len(got.get(cls, [])) for cls in (SEG_CLASS, SR_CLASS)]
            return got if min(counts) >= N_SERIES else None

        catalog = Catalog(database, create=False)
        try:
            def settled() -> list[JobRow] | None:
                jobs = catalog.list_jobs()
                finished = [j for j in jobs if j.state in ("done", "failed")]
                return jobs if len(finished) == N_SERIES else None

            try:
                jobs = wait_until(settled, 180, what="four jobs done or failed")
                got = wait_until(results_in, 30, what="4 SEG + 4 SR in the archive")
            except TimeoutError as exc:
                states = Counter(j.state for j in catalog.list_jobs())
                reasons = [j.reason for j in catalog.list_jobs() if j.reason]
                pytest.fail(f"{exc}; job states {dict(states)}, reasons {reasons}; "
                            f"node logs:\n{node.logs()[-8000:]}")
            outcome = [(j.id, j.state, j.reason) for j in jobs]
            assert [state for _, state, _ in outcome] == ["done"] * N_SERIES, outcome
            deliveries = {j.id: catalog.deliveries(j.id) for j in jobs}
        finally:
            catalog.close()

        # Both workers took jobs, and no job was encoded twice.
        by_worker = encoded_by(node)
        encoded = [job for ids in by_worker.values() for job in ids]
        assert sorted(encoded) == sorted(j.id for j in jobs), by_worker
        assert all(by_worker[name] for name in WORKERS), f"one worker took every job: {by_worker}"

        # Exactly once in the archive: one SEG + one SR per source series, nothing overwritten.
        received = [p for p in Path(storescp_archive.extra["received"]).iterdir() if p.is_file()]
        assert len(received) == 2 * N_SERIES, sorted(p.name for p in received)
        results = [ds for dss in got.values() for ds in dss]
        per_series = Counter((referenced_series(ds), str(ds.SOPClassUID)) for ds in results)
        expected = {(uid, cls): 1 for uid in phantoms for cls in (SEG_CLASS, SR_CLASS)}
        assert per_series == Counter(expected)
        assert "already exists" not in storescp_archive.log_text(), storescp_archive.log_text()
        assert all(len(rows) == 1 and rows[0].state == "done" and rows[0].attempts == 1
                   for rows in deliveries.values()), deliveries
        # The archived objects are the ones the catalog recorded (derived UIDs), one each.
        result_uids = [j.results[f"{role}_sop_instance_uid"] for j in jobs
                       for role in ("seg", "sr")]
        assert sorted(result_uids) == sorted(str(ds.SOPInstanceUID) for ds in results)

        for series_uid, phantom in phantoms.items():
            check_against_phantom(got, series_uid, phantom, dciodvfy_clean)
    finally:
        node.stop()


def orthanc_get(port: int, path: str) -> object:
    """GET on Orthanc's REST API as the demo user of docker/orthanc.json."""
    request = urllib.request.Request(f"http://{procs.LOOPBACK}:{port}{path}")
    token = base64.b64encode(b"demo:demo").decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback URL
        return json.loads(response.read())


def orthanc_post(port: int, path: str, body: str) -> object:
    request = urllib.request.Request(f"http://{procs.LOOPBACK}:{port}{path}", data=body.encode(),
                                     method="POST")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"demo:demo").decode())
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback URL
        return json.loads(response.read())


@pytest.mark.slow
def test_compose_orthanc_config_round_trip(tmp_path: Path) -> None:
    """The demo's docker/orthanc.json, run by a real Orthanc (ports and folders moved to the
    test's), sends a CT study to the node through its `dicom-node` modality entry, and the
    node's SEG + SR come back into Orthanc under the AE titles of docker/dicom-node.toml."""
    require_tool("Orthanc", "storescu")
    demo = load_settings(REPO / "docker" / "dicom-node.toml")
    config = json.loads((REPO / "docker" / "orthanc.json").read_text())
    http_port, dicom_port, node_port = procs.free_port(), procs.free_port(), procs.free_port()
    modality = next(m for m in config["DicomModalities"].values()
                    if m["AET"] == demo.listener.ae_title)
    modality.update({"Host": procs.LOOPBACK, "Port": node_port})
    storage = str(tmp_path / "orthanc-db")
    config.update({"HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
                   "StorageDirectory": storage, "IndexDirectory": storage})
    (tmp_path / "orthanc").mkdir()
    (tmp_path / "orthanc" / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc" / "orthanc.log").open("wb")
    orthanc = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc" / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    dest = demo.destination("pacs")
    node_dest = {"name": "pacs", "ae_title": dest.ae_title, "host": procs.LOOPBACK,
                 "port": dicom_port, "outputs": ["seg", "sr"]}  # the test expects CT, SEG, SR series
    rules = [{"name": r.name, "match": r.match, "models": r.models, "destinations": r.destinations}
             for r in demo.rules]
    node = start_node(tmp_path / "node", node_config(
        tmp_path / "node", port=node_port, destinations=[node_dest], rules=rules,
        listener={"ae_title": demo.listener.ae_title}))
    try:
        procs.wait_for_port(dicom_port, proc=orthanc)
        phantom = make_chest_phantom(ChestSpec(slices=12, seed=7))
        info = SeriesInfo(seed="compose-orthanc")
        files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "ct")
        res = procs.run_tool(["storescu", "-aet", "CT1", "-aec", config["DicomAet"], procs.LOOPBACK,
                              str(dicom_port), *map(str, files)])
        assert res.returncode == 0, res.stdout + res.stderr
        studies = orthanc_get(http_port, "/studies")
        assert isinstance(studies, list) and len(studies) == 1
        orthanc_post(http_port, "/modalities/dicom-node/store", studies[0])

        def results() -> list[str] | None:
            series = orthanc_get(http_port, f"/studies/{studies[0]}/series?expand")
            assert isinstance(series, list)
            modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            return modalities if modalities == ["CT", "SEG", "SR"] else None

        try:
            assert wait_until(results, 120, what="SEG + SR back in Orthanc") == ["CT", "SEG", "SR"]
        except TimeoutError:
            pytest.fail(f"results did not reach Orthanc; node logs:\n{node.logs()[-6000:]}")
        # Both new series reference the source CT series (read back through Orthanc's REST API).
        series = orthanc_get(http_port, f"/studies/{studies[0]}/series?expand")
        assert isinstance(series, list)
        for item in series:
            modality = item["MainDicomTags"]["Modality"]
            if modality == "CT":
                continue
            tags = orthanc_get(http_port, f"/instances/{item['Instances'][0]}/tags?simplify")
            assert isinstance(tags, dict)
            refs = (tags["ReferencedSeriesSequence"] if modality == "SEG" else
                    tags["CurrentRequestedProcedureEvidenceSequence"][0]["ReferencedSeriesSequence"])
            assert refs[0]["SeriesInstanceUID"] == info.uid("series"), modality
            assert tags["StudyInstanceUID"] == info.uid("study")
    finally:
        node.stop()
        procs.stop_process(orthanc)
