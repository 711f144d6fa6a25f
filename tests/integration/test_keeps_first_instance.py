"""Detecting an archive that keeps the first object of a SOP Instance UID (issue 22, item 4).

Orthanc with ``OverwriteInstances`` false (its default) acknowledges a re-sent object and keeps
the first; with true it replaces it.  A re-run's results carry the same SOP Instance UIDs with a
new InstanceCreationDate/Time: the C-FIND after delivery tells the two apart.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.catalog import KEEPS_FIRST_INSTANCE
from dicom_node.delivery import check_overwrite as delivery_check_overwrite
from dicom_node.delivery import send_files
from dicom_node.delivery.confirm import check_overwrite
from dicom_node.delivery.dicom import send_instances
from dicom_node.metrics import NodeMetrics
from dicom_node.settings import DestinationSettings
from tests.conftest import require_orthanc_dicomweb, require_tool
from tests.integration.test_faults import catalog_of, rule, series_files, storescu, wait_job
from tests.support import ohif, procs
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


def _web_destination(port: int) -> DestinationSettings:
    """A DICOMweb destination at ``http://127.0.0.1:port/dicom-web``, without credentials."""
    return DestinationSettings.model_validate(
        {"name": "web", "type": "dicomweb", "url": f"http://{procs.LOOPBACK}:{port}/dicom-web"})


@pytest.mark.parametrize("overwrite", [False, True], ids=["keeps-first", "overwrites"])
def test_the_qido_check_tells_a_dicomweb_archive_that_keeps_the_first(tmp_path: Path, overwrite: bool) -> None:
    """The same over DICOMweb: two versions sent with STOW-RS, then a QIDO-RS search for the
    creation time tells Orthanc keeping the first (OverwriteInstances false) from replacing."""
    require_orthanc_dicomweb()
    [src] = series_files(tmp_path, "keeps-first-web")[:1]
    first = _version(src, tmp_path / "v1" / "x.dcm", "101010.000001")
    second = _version(src, tmp_path / "v2" / "x.dcm", "111111.000002")
    with ohif.start_orthanc(tmp_path / "orthanc", extra={"OverwriteInstances": overwrite}) as server:
        dest = _web_destination(server.port)
        for version in (first, second):
            report = send_files(dest, [version], calling_ae_title="DICOM_NODE")
            assert report.sent == 1 and report.results[0].status == 0
        [check] = delivery_check_overwrite(dest, [second], calling_ae_title="DICOM_NODE")
    assert check.replaced is overwrite, check.detail
    if not overwrite:
        assert "20261206 101010.000001" in check.detail and "20261206 111111.000002" in check.detail


def test_the_qido_check_cannot_tell_when_the_server_does_not_answer(tmp_path: Path) -> None:
    """Nothing listening at the DICOMweb URL: unknown (None) with the reason, never a warning."""
    [path] = series_files(tmp_path, "keeps-first-web-down")[:1]
    dest = _web_destination(procs.free_port())
    [check] = delivery_check_overwrite(dest, [path], calling_ae_title="DICOM_NODE")
    assert check.replaced is None and "QIDO-RS" in check.detail and "unreachable" in check.detail


@pytest.mark.parametrize(("body", "content_type"), [
    (b'[["not an object"], "x", {"00080018": "no Value"}, {"00080012": {"Value": [null]}}]', "application/dicom+json"),
    (b"<html>proxy error</html>", "text/html"),
    (b'{"00080018": {"vr": "UI"}}', "application/dicom+json"),
], ids=["wrong-shapes", "html", "an-object-not-a-list"])
def test_the_qido_check_cannot_tell_from_a_broken_answer(tmp_path: Path, body: bytes, content_type: str) -> None:
    """A server (or a proxy in front of it) answering QIDO-RS with something that is not a list
    of DICOM JSON objects: unknown (None), never a warning, never an exception."""
    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((procs.LOOPBACK, 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        [path] = series_files(tmp_path, "keeps-first-web-broken")[:1]
        dest = _web_destination(server.server_port)
        [check] = delivery_check_overwrite(dest, [path], calling_ae_title="DICOM_NODE")
    finally:
        server.shutdown()
        server.server_close()
    assert check.replaced is None and "QIDO-RS" in check.detail, check.detail


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


@dataclass
class _Reruns:
    """What a node showed after a series was delivered and re-run twice."""

    jobs: list[Any]
    findings: list[Any]
    warned: list[str]
    events: list[str]
    exposition: str
    ready: dict[str, Any]
    health: dict[str, Any]
    log: str


def _deliver_and_rerun_twice(tmp_path: Path, destination: dict[str, Any], seed: str) -> _Reruns:
    """A node delivering ``ct-tissue`` SEG + SR to ``destination`` (named ``orthanc``): a series
    sent, done, then re-run twice through the API (same result UIDs, new content)."""
    workdir = tmp_path / "node"
    web_port = procs.free_port()
    destinations = [{"name": "orthanc", "find_delay_seconds": 0, "outputs": ["seg", "sr"],
                     "notify_not_applied": False, **destination}]
    node = start_node(workdir, node_config(workdir, idle_seconds=0.5, destinations=destinations,
                                            rules=[rule("ct", "ct-tissue", ["orthanc"])],
                                            web={"enabled": True, "host": procs.LOOPBACK, "port": web_port,
                                                 "api_token": "t0ken"}))
    try:
        storescu(node.port, series_files(tmp_path, seed))
        from dicom_node.demo import SeriesInfo

        series_uid = SeriesInfo(seed=seed).uid("series")
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
        events = [e.detail or "" for j in jobs for e in catalog.job_events(j.id)]
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/readyz", timeout=30) as answer:
            ready = json.loads(answer.read())
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/api/destinations", timeout=30) as answer:
            [health] = json.loads(answer.read())
        return _Reruns(jobs, catalog.destination_findings(), [e for e in events if "keeps the first object" in e],
                       events, NodeMetrics(catalog).exposition().decode(), ready, health,
                       (workdir / "node.log").read_text(errors="replace"))
    finally:
        node.stop()


def _assert_warned_once(seen: _Reruns) -> None:
    """One finding (the first re-run's), one job event, the metric, /readyz, the destination's
    health and one log line, each naming the fix."""
    assert [(f.destination, f.kind, f.job_id) for f in seen.findings] == [
        ("orthanc", KEEPS_FIRST_INSTANCE, seen.jobs[0].id)]
    assert len(seen.warned) == 1 and '"OverwriteInstances": true' in seen.warned[0], seen.events
    assert 'dicom_node_destination_keeps_first_instance{destination="orthanc"} 1.0' in seen.exposition
    assert "OverwriteInstances" in seen.ready["warnings"]["orthanc"]["keeps_first_instance"]
    assert seen.health["keeps_first_instance"] == seen.findings[0].detail
    assert seen.log.count('"event": "destination_keeps_first_instance"') == 1, seen.log[-3000:]


@pytest.mark.slow
def test_a_rerun_warns_once_about_an_archive_that_keeps_the_first(
        tmp_path: Path, orthanc: tuple[procs.Server, bool]) -> None:
    """End to end: a series delivered to Orthanc, then re-run twice (same result UIDs, new
    content).  OverwriteInstances false: one finding, one job event, the metric and /readyz's
    warning name the destination and the fix; true: none of them."""
    server, overwrite = orthanc
    seen = _deliver_and_rerun_twice(
        tmp_path, {"ae_title": "ORTHANC", "host": procs.LOOPBACK, "port": server.port}, "keeps-first-e2e")
    if overwrite:
        assert seen.findings == [] and seen.warned == []
        assert "dicom_node_destination_keeps_first_instance{" not in seen.exposition
        assert "warnings" not in seen.ready and seen.health["keeps_first_instance"] is None
    else:
        _assert_warned_once(seen)


@pytest.mark.slow
def test_a_rerun_warns_once_about_a_dicomweb_archive_that_keeps_the_first(tmp_path: Path) -> None:
    """The same through STOW-RS and QIDO-RS: Orthanc's DICOMweb with OverwriteInstances false
    acknowledges the re-run's objects and keeps the first; the node says so once."""
    require_orthanc_dicomweb()
    with ohif.start_orthanc(tmp_path / "orthanc", extra={"OverwriteInstances": False}) as server:
        seen = _deliver_and_rerun_twice(
            tmp_path, {"type": "dicomweb", "url": f"http://{procs.LOOPBACK}:{server.port}/dicom-web"},
            "keeps-first-web-e2e")
    _assert_warned_once(seen)
