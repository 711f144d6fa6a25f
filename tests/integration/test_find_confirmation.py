"""C-FIND verification (``commitment = "find"``) against a real query SCP (Orthanc).

DCMTK ``storescp`` plays an archive that stores but cannot be queried; Orthanc, which also
receives the results, is its query SCP (``find_ae_title`` / ``find_host`` / ``find_port``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.catalog import queries
from dicom_node.delivery.confirm import confirm_by_find
from dicom_node.metrics import NodeMetrics
from dicom_node.settings import DestinationSettings
from tests.conftest import require_tool
from tests.integration.test_faults import catalog_of, rule, series_files, storescu, wait_job
from tests.support import procs
from tests.support.node import node_config, start_node


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[procs.Server]:
    """Orthanc (AE ORTHANC) answering C-FIND from the node's AE DICOM_NODE, on free ports."""
    require_tool("Orthanc")
    work = tmp_path / "orthanc"
    (work / "db").mkdir(parents=True)
    http, dicom = procs.free_port(), procs.free_port()
    (work / "orthanc.json").write_text(json.dumps({
        "Name": "find-scp", "DicomAet": "ORTHANC", "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"), "HttpPort": http, "DicomPort": dicom,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {"node": ["DICOM_NODE", procs.LOOPBACK, 104]},
    }))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    server = procs.Server(proc, dicom, work, work / "orthanc.log", extra={"http_port": str(http)})
    try:
        procs.wait_for_port(dicom, proc=proc, timeout=60)
        procs.wait_for_port(http, proc=proc, timeout=60)
        yield server
    finally:
        proc.kill()  # a throwaway archive: Orthanc's orderly stop takes 3 s
        proc.wait(10)


def _orthanc_dest(server: procs.Server) -> DestinationSettings:
    return DestinationSettings(name="orthanc", ae_title="ORTHANC", host=procs.LOOPBACK, port=server.port)


def test_find_confirms_what_the_scp_holds_and_not_what_it_lacks(tmp_path: Path, orthanc: procs.Server) -> None:
    """One object stored at Orthanc is confirmed; one never sent is unconfirmed, with the reason."""
    from dicom_node.delivery.dicom import send_instances

    held, missing = series_files(tmp_path, "find-direct")[:2]
    send_instances(_orthanc_dest(orthanc), [held], calling_ae_title="DICOM_NODE")
    found = confirm_by_find(_orthanc_dest(orthanc), [held, missing], calling_ae_title="DICOM_NODE")
    assert [c.confirmed for c in found] == [True, False]
    assert found[0].reason is None
    assert found[1].reason == f"not found by C-FIND at ORTHANC@{procs.LOOPBACK}:{orthanc.port}"


def test_find_at_an_scp_that_cannot_be_queried_is_unconfirmed(tmp_path: Path) -> None:
    """storescp offers no C-FIND: every object is unconfirmed, saying why."""
    server = procs.start_storescp(tmp_path / "scp")
    try:
        [path] = series_files(tmp_path, "find-noquery")[:1]
        dest = DestinationSettings(name="a", ae_title="ARCHIVE", host=procs.LOOPBACK, port=server.port,
                                   commitment="find")
        [result] = confirm_by_find(dest, [path], calling_ae_title="DICOM_NODE")
    finally:
        server.stop()
    assert not result.confirmed
    assert result.reason is not None and result.reason.startswith("C-FIND not possible:")


@pytest.mark.slow
def test_a_job_is_confirmed_by_find_at_the_archive_query_scp(tmp_path: Path, orthanc: procs.Server) -> None:
    """End to end: storescp ``archive`` verified through Orthanc's C-FIND is ``confirmed``; ``early``,
    verified before Orthanc got the results (it is delivered first, delay 0), is ``unconfirmed``;
    both deliveries are done and the job is done; the gauge counts the unconfirmed objects."""
    archive = procs.start_storescp(tmp_path / "archive", ae_title="ARCHIVE")
    early = procs.start_storescp(tmp_path / "early", ae_title="EARLY")
    find_at = {"commitment": "find", "find_ae_title": "ORTHANC", "find_host": procs.LOOPBACK,
               "find_port": orthanc.port}
    # The SEG and SR only (the default output profile adds GSPS, KOS and SC): the test counts them.
    seg_sr = {"outputs": ["seg", "sr"], "notify_not_applied": False}
    destinations = [
        {"name": "early", "ae_title": "EARLY", "host": procs.LOOPBACK, "port": early.port,
         "find_delay_seconds": 0, **find_at, **seg_sr},
        {"name": "orthanc", "ae_title": "ORTHANC", "host": procs.LOOPBACK, "port": orthanc.port, **seg_sr},
        {"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port,
         "find_delay_seconds": 0.5, **find_at, **seg_sr},
    ]
    workdir = tmp_path / "node"
    node = None
    try:
        node = start_node(workdir, node_config(workdir, idle_seconds=0.5, destinations=destinations,
                                                rules=[rule("ct", "ct-tissue", ["early", "orthanc", "archive"])]))
        storescu(node.port, series_files(tmp_path, "find-e2e"))
        from dicom_node.demo import SeriesInfo

        catalog = catalog_of(node)
        job = wait_job(node, catalog, SeriesInfo(seed="find-e2e").uid("series"), ("done", "failed"))
        assert job.state == "done", job.reason
        results = {job.results["seg_sop_instance_uid"], job.results["sr_sop_instance_uid"]}
        by_dest = {d.destination: d for d in catalog.deliveries(job.id)}
        assert {d.state for d in by_dest.values()} == {"done"}
        archive_objects = by_dest["archive"].objects
        assert {o["sop_instance_uid"] for o in archive_objects} == results
        assert {o["outcome"] for o in archive_objects} == {"confirmed"}
        assert by_dest["archive"].confirmation == "confirmed"
        assert {o["outcome"] for o in by_dest["early"].objects} == {"unconfirmed"}
        assert {o["detail"] for o in by_dest["early"].objects} == {
            f"not found by C-FIND at ORTHANC@{procs.LOOPBACK}:{orthanc.port}"}
        assert by_dest["early"].confirmation == "unconfirmed"
        assert by_dest["orthanc"].confirmation is None
        assert {o["outcome"] for o in by_dest["orthanc"].objects} == {"sent"}
        assert queries.unconfirmed_objects(catalog) == {"early": 2}
        exposition = NodeMetrics(catalog).exposition().decode()
        assert 'dicom_node_delivery_unconfirmed{destination="early"} 2.0' in exposition
        # Only confirmed objects have a confirmation time: the archive's two, none of early's.
        assert 'dicom_node_delivery_confirmation_seconds_count{destination="archive"} 2.0' in exposition
        assert 'dicom_node_delivery_confirmation_seconds_count{destination="early"}' not in exposition
        assert all(0.5 <= o["confirmation_seconds"] < 60 for o in archive_objects)
    finally:
        if node is not None:
            node.stop()
        archive.stop()
        early.stop()
