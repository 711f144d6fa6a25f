"""Storage commitment (``commitment = "storage-commitment"``) against a real SCP: Orthanc.

Orthanc answers an N-ACTION at once and sends its N-EVENT-REPORT later, on an association it
opens to the node (the ``DicomModalities`` entry of the node's AE title): the node's listener
must take it.  The node's own parts are real (listener, catalog recorder, catalog, commitment
loop); so are the node processes of the crash test.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.catalog import Catalog, JobSpec, commitments
from dicom_node.catalog.recorder import CatalogRecorder, instance_from_file
from dicom_node.delivery.dicom import send_instances
from dicom_node.ingest.listener import Listener
from dicom_node.ingest.spool import Spool
from dicom_node.metrics import NodeMetrics
from dicom_node.scheduling.commitment import advance, start_transaction
from dicom_node.settings import DestinationSettings, ListenerSettings, Settings, StorageSettings
from tests.conftest import require_tool
from tests.integration.test_faults import catalog_of, rule, series_files, storescu, wait_job
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until


def start_orthanc(work: Path, node_port: int) -> procs.Server:
    """Orthanc (AE ORTHANC) that knows the node (AE DICOM_NODE at ``node_port``) for its reports."""
    require_tool("Orthanc")
    (work / "db").mkdir(parents=True)
    http, dicom = procs.free_port(), procs.free_port()
    (work / "orthanc.json").write_text(json.dumps({
        "Name": "commitment-scp", "DicomAet": "ORTHANC", "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"), "HttpPort": http, "DicomPort": dicom,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {"node": ["DICOM_NODE", procs.LOOPBACK, node_port]},
    }))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    server = procs.Server(proc, dicom, work, work / "orthanc.log", extra={"http_port": str(http)})
    try:
        procs.wait_for_port(dicom, proc=proc, timeout=60)
        procs.wait_for_port(http, proc=proc, timeout=60)
    except Exception:
        procs.stop_process(proc)
        raise
    return server


def _rest(server: procs.Server, method: str, path: str, body: bytes | None = None) -> Any:
    url = f"http://{procs.LOOPBACK}:{server.extra['http_port']}{path}"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=10) as rsp:
        text = rsp.read()
    return json.loads(text) if text else None


def orthanc_has(server: procs.Server, sop_instance_uid: str) -> str | None:
    """Orthanc's id of the instance, or None."""
    found = _rest(server, "POST", "/tools/lookup", sop_instance_uid.encode())
    return next((f["ID"] for f in found if f["Type"] == "Instance"), None)


class NodeSide:
    """The node's listener (with the catalog recorder) and catalog, in this process."""

    def __init__(self, root: Path, database_url: str | None = None) -> None:
        self.catalog = Catalog(database_url or f"sqlite:///{root / 'node.db'}")
        self.recorder = CatalogRecorder(self.catalog)
        self.recorder.start()
        storage = StorageSettings(root=root / "spool", min_free_mb=0)
        self.listener_settings = ListenerSettings(ae_title="DICOM_NODE", host=procs.LOOPBACK, port=procs.free_port())
        self.listener = Listener(self.listener_settings, Spool(storage.root), self.recorder, storage)
        self.listener.start()

    def job(self, files: list[Path]) -> int:
        """A job in the catalog for the series of ``files`` (the delivery rows need one)."""
        instances = [instance_from_file(f) for f in files]
        self.catalog.record_instances(instances)
        [job_id] = self.catalog.create_jobs([JobSpec(instances[0].series_instance_uid, "r", "m", ["orthanc"])])
        return job_id

    def settle(self, settings: Settings, job_id: int, timeout: float = 30) -> list[Any]:
        """Run the commitment loop's passes until every transaction of the job is closed."""
        def closed() -> list[Any] | None:
            advance(settings, self.catalog)
            rows = commitments.of_job(self.catalog, job_id)
            return rows if rows and all(r.state == commitments.CLOSED for r in rows) else None
        return wait_until(closed, timeout, interval=0.3, what="storage commitment closed")  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.listener.stop()
        self.recorder.stop()
        self.catalog.close()


@pytest.fixture
def node_and_orthanc(tmp_path: Path) -> Iterator[tuple[NodeSide, procs.Server]]:
    node = NodeSide(tmp_path / "node")
    server = start_orthanc(tmp_path / "orthanc", node.listener_settings.port)
    try:
        yield node, server
    finally:
        server.stop()
        node.stop()


def _dest(server: procs.Server, **kw: Any) -> DestinationSettings:
    values: dict[str, Any] = {"commitment_wait_seconds": 0, "commitment_timeout_seconds": 10, **kw}
    return DestinationSettings(name="orthanc", ae_title="ORTHANC", host=procs.LOOPBACK, port=server.port,
                               commitment="storage-commitment", **values)


def _deliver_and_lose_one(node: NodeSide, server: procs.Server, dest: DestinationSettings, tmp: Path,
                          seed: str) -> tuple[int, list[Path], str]:
    """C-STORE two files to Orthanc, delete the second there (REST), then request commitment."""
    files = series_files(tmp, seed)[:2]
    job_id = node.job(files)
    report = send_instances(dest, files, calling_ae_title="DICOM_NODE")
    lost = report.results[1].sop_instance_uid
    orthanc_id = orthanc_has(server, lost)
    assert orthanc_id is not None
    _rest(server, "DELETE", f"/instances/{orthanc_id}")
    assert orthanc_has(server, lost) is None
    started = time.monotonic()
    start_transaction(node.catalog, job_id, dest, report, report.records(), calling_ae_title="DICOM_NODE")
    # The wait on the N-ACTION's association ends as soon as the report came on another one.
    assert time.monotonic() - started < dest.commitment_wait_seconds or dest.commitment_wait_seconds == 0
    return job_id, files, lost


def test_a_failed_commitment_is_sent_again_then_confirmed(tmp_path: Path,
                                                          node_and_orthanc: tuple[NodeSide, procs.Server]) -> None:
    """Orthanc lost one object between the store and the N-ACTION: its report (on a new
    association to the listener) fails that one; the node sends it again, asks again, and both
    objects end ``confirmed`` with their confirmation time."""
    node, server = node_and_orthanc
    dest = _dest(server, commitment_resends=1, commitment_wait_seconds=5)
    settings = Settings(listener=node.listener_settings, destinations=[dest])
    job_id, _files, lost = _deliver_and_lose_one(node, server, dest, tmp_path, "commit-resend")
    first, second = node.settle(settings, job_id)
    assert first.round == 0 and first.requests == 1 and first.reported_at is not None
    assert list(first.report["failed"]) == [lost]
    assert first.report["failed"][lost].endswith("(0x0112)"), first.report  # no such object instance
    assert [o["sop_instance_uid"] for o in second.objects] == [lost]
    assert second.round == 1 and second.report["committed"] == [lost] and not second.report["failed"]
    assert orthanc_has(server, lost) is not None
    [delivery] = node.catalog.deliveries(job_id)
    assert {o["outcome"] for o in delivery.objects} == {"confirmed"}
    assert all(o["confirmation_seconds"] >= 0 for o in delivery.objects)
    assert delivery.confirmation == "confirmed"
    exposition = NodeMetrics(node.catalog).exposition().decode()
    assert 'dicom_node_delivery_confirmation_seconds_count{destination="orthanc"} 2.0' in exposition


def test_a_failed_commitment_without_resends_is_surfaced(tmp_path: Path,
                                                         node_and_orthanc: tuple[NodeSide, procs.Server]) -> None:
    """With ``commitment_resends = 0`` the lost object is ``unconfirmed`` with Orthanc's reason,
    the other ``confirmed``; the unconfirmed gauge counts it."""
    node, server = node_and_orthanc
    dest = _dest(server, commitment_resends=0)
    settings = Settings(listener=node.listener_settings, destinations=[dest])
    job_id, _files, lost = _deliver_and_lose_one(node, server, dest, tmp_path, "commit-surface")
    [row] = node.settle(settings, job_id)
    [delivery] = node.catalog.deliveries(job_id)
    outcome = {o["sop_instance_uid"]: o for o in delivery.objects}
    assert outcome[lost]["outcome"] == "unconfirmed"
    assert outcome[lost]["detail"] == f"storage commitment failed: {row.report['failed'][lost]}"
    assert "no such object instance" in outcome[lost]["detail"]
    assert [o["outcome"] for uid, o in outcome.items() if uid != lost] == ["confirmed"]
    assert delivery.confirmation == "unconfirmed"
    exposition = NodeMetrics(node.catalog).exposition().decode()
    assert 'dicom_node_delivery_unconfirmed{destination="orthanc"} 1.0' in exposition


def test_a_timed_out_request_is_asked_again_then_surfaced(tmp_path: Path) -> None:
    """An archive that never reports (Orthanc not knowing the node's address): the N-ACTION is
    sent ``commitment_max_requests`` times with the same Transaction UID, then the objects are
    ``unconfirmed`` saying so."""
    node = NodeSide(tmp_path / "node")
    server = start_orthanc(tmp_path / "orthanc", procs.free_port())  # reports go nowhere
    try:
        dest = _dest(server, commitment_timeout_seconds=0.5, commitment_max_requests=2)
        settings = Settings(listener=node.listener_settings, destinations=[dest])
        files = series_files(tmp_path, "commit-timeout")[:1]
        job_id = node.job(files)
        report = send_instances(dest, files, calling_ae_title="DICOM_NODE")
        start_transaction(node.catalog, job_id, dest, report, report.records(), calling_ae_title="DICOM_NODE")
        [row] = node.settle(settings, job_id)
        assert row.requests == 2 and row.report_json is None
        [delivery] = node.catalog.deliveries(job_id)
        [obj] = delivery.objects
        assert obj["outcome"] == "unconfirmed"
        assert obj["detail"] == (f"no storage commitment report from ORTHANC@{procs.LOOPBACK}:{server.port} "
                                 "within 0.5 s of each of 2 N-ACTION requests")
    finally:
        server.stop()
        node.stop()


@pytest.mark.slow
def test_a_node_killed_before_the_report_completes_the_commitment_once(tmp_path: Path) -> None:
    """End to end: a node SIGKILLed as Orthanc's N-EVENT-REPORT arrives (the report is lost)
    finds the transaction in its catalog at restart, asks again with the same Transaction UID
    after ``commitment_timeout_seconds``, and closes it exactly once: all objects confirmed."""
    port = procs.free_port()
    server = start_orthanc(tmp_path / "orthanc", port)
    destinations = [{"name": "orthanc", "ae_title": "ORTHANC", "host": procs.LOOPBACK, "port": server.port,
                     "outputs": ["seg", "sr"], "notify_not_applied": False, "commitment": "storage-commitment",
                     "commitment_wait_seconds": 0, "commitment_timeout_seconds": 2}]
    workdir = tmp_path / "node"
    config = node_config(workdir, port=port, idle_seconds=0.5, destinations=destinations,
                         rules=[rule("ct", "ct-tissue", ["orthanc"])])
    node = None
    try:
        node = start_node(workdir, config, extra_env={"DICOM_NODE_CRASH_POINT": "commitment_report"})
        storescu(node.port, series_files(tmp_path, "commit-crash"))
        node.server.proc.wait(timeout=120)  # killed by its crash point, as the report came in
        assert node.server.proc.returncode == -9, node.logs()[-3000:]
        catalog = Catalog(f"sqlite:///{workdir / 'node.db'}")
        [before] = [r for r in commitments.open_transactions(catalog)]
        assert before.state == commitments.REQUESTED and before.requests == 1
        catalog.close()
        started = time.monotonic()
        node = start_node(workdir, config)
        catalog = catalog_of(node)
        from dicom_node.demo import SeriesInfo

        job = wait_job(node, catalog, SeriesInfo(seed="commit-crash").uid("series"), ("done", "failed"))
        assert job.state == "done", job.reason
        wait_until(lambda: all(r.state == commitments.CLOSED for r in commitments.of_job(catalog, job.id)),
                   60, what="the commitment closed after the restart")
        [after] = commitments.of_job(catalog, job.id)
        assert after.transaction_uid == before.transaction_uid
        assert after.requests == 2  # asked again once, never duplicated
        assert time.monotonic() - started >= 2 - 0.5
        [delivery] = catalog.deliveries(job.id)
        results = {job.results["seg_sop_instance_uid"], job.results["sr_sop_instance_uid"]}
        assert {o["sop_instance_uid"] for o in delivery.objects} == results
        assert {o["outcome"] for o in delivery.objects} == {"confirmed"}
        closed = [line for line in node.logs().splitlines()
                  if '"commitment_closed"' in line and before.transaction_uid in line]
        assert len(closed) == 1, closed
    finally:
        if node is not None:
            node.stop()
        server.stop()


def test_a_report_on_the_same_association_is_taken(tmp_path: Path) -> None:
    """An archive that accepts our SCP role and reports on the N-ACTION's own association
    (played by a pynetdicom Storage Commitment SCP: Orthanc and dcm4chee-arc always open a new
    one): the worker's wait takes the report, the loop confirms the objects."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )

    def on_action(event: Any) -> tuple[int, None]:
        info, assoc = event.action_information, event.assoc

        def report() -> None:
            time.sleep(0.2)  # after the N-ACTION-RSP
            ds = Dataset()
            ds.TransactionUID = info.TransactionUID
            ds.ReferencedSOPSequence = info.ReferencedSOPSequence
            assoc.send_n_event_report(ds, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    scp = AE("ARCHIVE")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = procs.free_port()
    server = scp.start_server((procs.LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    assert server is not None
    node = NodeSide(tmp_path / "node")
    try:
        dest = DestinationSettings(name="orthanc", ae_title="ARCHIVE", host=procs.LOOPBACK, port=port,
                                   commitment="storage-commitment", commitment_wait_seconds=5)
        settings = Settings(listener=node.listener_settings, destinations=[dest])
        files = series_files(tmp_path, "commit-same")[:2]
        job_id = node.job(files)
        from dicom_node.delivery.report import InstanceResult, SendReport

        meta = [instance_from_file(f) for f in files]
        sent = SendReport("orthanc", tuple(InstanceResult(f, m.sop_instance_uid, 0, sop_class_uid=m.sop_class_uid)
                                           for f, m in zip(files, meta, strict=True)))
        start_transaction(node.catalog, job_id, dest, sent, sent.records(), calling_ae_title="DICOM_NODE")
        [row] = commitments.of_job(node.catalog, job_id)
        assert row.state == commitments.REPORTED and row.requests == 1  # before any loop pass
        [row] = node.settle(settings, job_id)
        [delivery] = node.catalog.deliveries(job_id)
        assert {o["outcome"] for o in delivery.objects} == {"confirmed"}
    finally:
        node.stop()
        server.shutdown()


class HoldingArchive:
    """A pynetdicom archive (AE ARCHIVE: C-STORE and Storage Commitment SCP) that answers every
    N-ACTION at once and keeps its N-EVENT-REPORT until the test sends it, on a new association
    to the node's listener (as Orthanc and dcm4chee-arc do): a report as late as the test wants."""

    def __init__(self, node_port: int) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel  # type: ignore[attr-defined]

        self.node_port = node_port
        self.stored: list[str] = []
        #: Transaction UID -> the SOP Instance UIDs asked for, in the order of the N-ACTIONs.
        self.asked: dict[str, list[str]] = {}

        def on_store(event: Any) -> int:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        def on_action(event: Any) -> tuple[int, None]:
            info = event.action_information
            self.asked[str(info.TransactionUID)] = [str(i.ReferencedSOPInstanceUID)
                                                    for i in info.ReferencedSOPSequence]
            return 0x0000, None

        ae = AE("ARCHIVE")
        ae.add_supported_context(CTImageStorage)
        ae.add_supported_context(StorageCommitmentPushModel)
        self.port = procs.free_port()
        self.server = ae.start_server((procs.LOOPBACK, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)])

    def report(self, transaction_uid: str, sop_class_uid: str, *, failed: bool) -> int:
        """Send the report of ``transaction_uid`` now (every object committed, or every one
        failed with 0x0112, no such object instance); return the node's status."""
        from pydicom.dataset import Dataset
        from pynetdicom import AE, build_role
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )

        ds = Dataset()
        ds.TransactionUID = transaction_uid
        items = []
        for uid in self.asked[transaction_uid]:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class_uid
            item.ReferencedSOPInstanceUID = uid
            if failed:
                item.FailureReason = 0x0112
            items.append(item)
        if failed:
            ds.FailedSOPSequence = items
        else:
            ds.ReferencedSOPSequence = items
        ae = AE("ARCHIVE")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(procs.LOOPBACK, self.node_port, ae_title="DICOM_NODE",
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_event_report(ds, 2 if failed else 1, StorageCommitmentPushModel,
                                                  StorageCommitmentPushModelInstance)
            return int(status.Status)
        finally:
            assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_late_report_of_a_resent_delivery_leaves_the_new_delivery_alone(tmp_path: Path, database: str) -> None:
    """The race: a delivery's transaction is still open when ``resend`` repeats the delivery
    (same objects, same SOP Instance UIDs, same delivery row); the archive's report of the first
    transaction arrives only after the second delivery was recorded, and it says every object
    failed.  It must not touch the second delivery's objects (before the fix it made them
    ``unconfirmed``): the resend superseded the first transaction, the report is kept out, and
    only the second transaction's report confirms the objects.  On SQLite and PostgreSQL (the
    supersede is a locking update there)."""
    from dicom_node.catalog import JobState
    from dicom_node.scheduling import operator
    from tests.conftest import require_postgres
    from tests.support.queues import MemoryQueue

    postgres = None
    if database == "postgresql":
        postgres = require_postgres()
    node = NodeSide(tmp_path / "node", postgres.create_database() if postgres else None)
    archive = HoldingArchive(node.listener_settings.port)
    try:
        dest = DestinationSettings(name="orthanc", ae_title="ARCHIVE", host=procs.LOOPBACK, port=archive.port,
                                   commitment="storage-commitment", commitment_wait_seconds=0,
                                   commitment_timeout_seconds=600, commitment_resends=0)
        settings = Settings(listener=node.listener_settings, destinations=[dest])
        files = series_files(tmp_path, "commit-resend-race")[:3]
        job_id = node.job(files)
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.DELIVERING):
            node.catalog.transition(job_id, state)
        node.catalog.set_results(job_id, {"files": [str(f) for f in files]})

        def deliver() -> str:
            """What the worker's dispatch does for a storage-commitment destination."""
            before = {r.transaction_uid for r in commitments.of_job(node.catalog, job_id)}
            report = send_instances(dest, files, calling_ae_title="DICOM_NODE")
            start_transaction(node.catalog, job_id, dest, report, report.records(), calling_ae_title="DICOM_NODE")
            [new] = {r.transaction_uid for r in commitments.of_job(node.catalog, job_id)} - before
            return new

        first = deliver()
        node.catalog.transition(job_id, JobState.DONE)
        sop_class = instance_from_file(files[0]).sop_class_uid
        uids = [instance_from_file(f).sop_instance_uid for f in files]
        assert archive.asked[first] == uids

        queue = MemoryQueue()
        operator.resend(node.catalog, queue, settings, str(job_id), by="test")
        assert queue.dispatch == [job_id]
        assert commitments.get(node.catalog, first).state == commitments.SUPERSEDED  # type: ignore[union-attr]
        node.catalog.transition(job_id, JobState.DELIVERING)
        second = deliver()
        assert second != first and archive.asked[second] == uids
        assert archive.stored == uids + uids  # delivered twice, same objects

        # The first transaction's report, late, says every object failed.
        assert archive.report(first, sop_class, failed=True) == 0x0000  # taken, and kept out
        advance(settings, node.catalog)
        old = commitments.get(node.catalog, first)
        assert old is not None and old.state == commitments.SUPERSEDED and old.report_json is None
        [delivery] = node.catalog.deliveries(job_id)
        assert [o["sop_instance_uid"] for o in delivery.objects] == uids
        assert {o["outcome"] for o in delivery.objects} == {"sent"}, delivery.objects
        assert delivery.confirmation is None

        # The second transaction's own report confirms them.
        assert archive.report(second, sop_class, failed=False) == 0x0000
        advance(settings, node.catalog)
        rows = {r.transaction_uid: r.state for r in commitments.of_job(node.catalog, job_id)}
        assert rows == {first: commitments.SUPERSEDED, second: commitments.CLOSED}
        [delivery] = node.catalog.deliveries(job_id)
        assert {o["outcome"] for o in delivery.objects} == {"confirmed"}, delivery.objects
        assert delivery.confirmation == "confirmed"
        events = [e.detail or "" for e in node.catalog.job_events(job_id)]
        assert any("resend by operator (test)" in e for e in events)
        assert any(f"superseded (resend by operator (test) to orthanc): a late report for transaction {first}"
                   in e for e in events), events
    finally:
        archive.stop()
        node.stop()
        if postgres is not None:
            postgres.stop()
