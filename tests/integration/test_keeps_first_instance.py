"""Detecting an archive that keeps the first object of a SOP Instance UID (issue 22, item 4).

Orthanc with ``OverwriteInstances`` false (its default) acknowledges a re-sent object and keeps
the first; with true it replaces it.  A re-run's results carry the same SOP Instance UIDs with a
new InstanceCreationDate/Time: the C-FIND after delivery tells the two apart.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.catalog import KEEPS_FIRST_INSTANCE
from dicom_node.delivery.confirm import check_overwrite
from dicom_node.delivery.dicom import send_instances
from dicom_node.metrics import NodeMetrics
from dicom_node.settings import DestinationSettings
from tests.conftest import require_tool
from tests.integration.test_faults import catalog_of, rule, series_files, storescu, wait_job
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until


def _orthanc(work: Path, overwrite: bool) -> Iterator[procs.Server]:
    require_tool("Orthanc")
    (work / "db").mkdir(parents=True)
    http, dicom = procs.free_port(), procs.free_port()
    (work / "orthanc.json").write_text(json.dumps({
        "Name": "keeps-first", "DicomAet": "ORTHANC", "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"), "HttpPort": http, "DicomPort": dicom,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAlwaysAllowFind": True,
        "OverwriteInstances": overwrite,
    }))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    log.close()
    server = procs.Server(proc, dicom, work, work / "orthanc.log", extra={"http_port": str(http)})
    try:
        procs.wait_for_port(dicom, proc=proc, timeout=60)
        procs.wait_for_port(http, proc=proc, timeout=60)
        yield server
    finally:
        proc.kill()  # a throwaway archive: Orthanc's orderly stop takes 3 s
        proc.wait(10)


@pytest.fixture(params=[False, True], ids=["keeps-first", "overwrites"])
def orthanc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[procs.Server, bool]]:
    """Orthanc with ``OverwriteInstances`` false, then true."""
    for server in _orthanc(tmp_path / "orthanc", request.param):
        yield server, request.param


def _version(src: Path, dst: Path, time: str) -> Path:
    ds = dcmread(src)
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20261206", time
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def test_the_check_tells_an_archive_that_keeps_the_first_from_one_that_replaces(
        tmp_path: Path, orthanc: tuple[procs.Server, bool]) -> None:
    """The same SOP Instance UID sent twice with two creation times: Orthanc holds the first
    (OverwriteInstances false: ``replaced`` False, naming both times) or the second (true)."""
    server, overwrite = orthanc
    dest = DestinationSettings(name="orthanc", ae_title="ORTHANC", host=procs.LOOPBACK, port=server.port)
    [src] = series_files(tmp_path, "keeps-first-direct")[:1]
    first = _version(src, tmp_path / "v1" / "x.dcm", "101010.000001")
    second = _version(src, tmp_path / "v2" / "x.dcm", "111111.000002")
    send_instances(dest, [first], calling_ae_title="DICOM_NODE")
    send_instances(dest, [second], calling_ae_title="DICOM_NODE")
    [check] = check_overwrite(dest, [second], calling_ae_title="DICOM_NODE")
    assert check.replaced is overwrite, check.detail
    if not overwrite:
        assert "20261206 101010.000001" in check.detail and "20261206 111111.000002" in check.detail


def test_the_check_cannot_tell_without_a_query_scp(tmp_path: Path) -> None:
    """storescp answers no C-FIND: unknown (None), never a warning."""
    server = procs.start_storescp(tmp_path / "scp")
    try:
        [path] = series_files(tmp_path, "keeps-first-noquery")[:1]
        dest = DestinationSettings(name="a", ae_title="ARCHIVE", host=procs.LOOPBACK, port=server.port)
        [check] = check_overwrite(dest, [path], calling_ae_title="DICOM_NODE")
    finally:
        server.stop()
    assert check.replaced is None and "C-FIND" in check.detail


@pytest.mark.slow
def test_a_rerun_warns_once_about_an_archive_that_keeps_the_first(
        tmp_path: Path, orthanc: tuple[procs.Server, bool]) -> None:
    """End to end: a series delivered to Orthanc, then re-run twice (same result UIDs, new
    content).  OverwriteInstances false: one finding, one job event, the metric and /readyz's
    warning name the destination and the fix; true: none of them."""
    server, overwrite = orthanc
    seg_sr = {"outputs": ["seg", "sr"], "notify_not_applied": False}
    destinations = [{"name": "orthanc", "ae_title": "ORTHANC", "host": procs.LOOPBACK, "port": server.port,
                     "find_delay_seconds": 0, **seg_sr}]
    workdir = tmp_path / "node"
    web_port = procs.free_port()
    node = start_node(workdir, node_config(workdir, idle_seconds=0.5, destinations=destinations,
                                            rules=[rule("ct", "ct-tissue", ["orthanc"])],
                                            web={"enabled": True, "host": procs.LOOPBACK, "port": web_port,
                                                 "api_token": "t0ken"}))
    try:
        storescu(node.port, series_files(tmp_path, "keeps-first-e2e"))
        from dicom_node.demo import SeriesInfo

        series_uid = SeriesInfo(seed="keeps-first-e2e").uid("series")
        catalog = catalog_of(node)
        first = wait_job(node, catalog, series_uid, ("done", "failed"))
        assert first.state == "done", first.reason
        jobs = []
        for _ in range(2):  # the second re-run must not warn again
            request = urllib.request.Request(f"http://{procs.LOOPBACK}:{web_port}/api/series/{series_uid}/rerun",
                                             method="POST", headers={"Authorization": "Bearer t0ken"})
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (loopback)
                [job_id] = json.loads(answer.read())["job_ids"]
            wait_until(lambda job_id=job_id: (j := catalog.get_job(job_id)) is not None
                             and j.state in ("done", "failed"), 90, what=f"re-run job {job_id}")
            job = catalog.get_job(job_id)
            assert job is not None and job.state == "done", job
            jobs.append(job)
        findings = catalog.destination_findings()
        events = [e.detail or "" for j in jobs for e in catalog.job_events(j.id)]
        warned = [e for e in events if "keeps the first object" in e]
        exposition = NodeMetrics(catalog).exposition().decode()
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/readyz", timeout=30) as answer:
            ready = json.loads(answer.read())
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/api/destinations", timeout=30) as answer:
            [health] = json.loads(answer.read())
        log = (workdir / "node.log").read_text(errors="replace")
    finally:
        node.stop()
    if overwrite:
        assert findings == [] and warned == []
        assert "dicom_node_destination_keeps_first_instance{" not in exposition
        assert "warnings" not in ready and health["keeps_first_instance"] is None
    else:
        assert [(f.destination, f.kind, f.job_id) for f in findings] == [("orthanc", KEEPS_FIRST_INSTANCE, jobs[0].id)]
        assert len(warned) == 1 and '"OverwriteInstances": true' in warned[0], events
        assert 'dicom_node_destination_keeps_first_instance{destination="orthanc"} 1.0' in exposition
        assert "OverwriteInstances" in ready["warnings"]["orthanc"]["keeps_first_instance"]
        assert health["keeps_first_instance"] == findings[0].detail
        assert log.count('"event": "destination_keeps_first_instance"') == 1, log[-3000:]
