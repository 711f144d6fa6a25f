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

    def __init__(self, root: Path) -> None:
        self.catalog = Catalog(f"sqlite:///{root / 'node.db'}")
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
