"""The ``dicomweb`` destination type: results stored with STOW-RS in a real Orthanc (Debian
``orthanc-dicomweb`` plugin) behind HTTP basic authentication, credentials from a file or the
environment, readable failures without the secret in them."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.delivery import reachable, send_files
from dicom_node.errors import PermanentError, TransientError
from dicom_node.settings import DestinationSettings
from tests.conftest import require_orthanc_dicomweb
from tests.integration.test_faults import catalog_of, rule, series_files, storescu, wait_job
from tests.support import ohif, procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = pytest.mark.integration
USER, PASSWORD = "node", "s3cret-stow-pw"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[procs.Server]:
    """Orthanc with its DICOMweb plugin at /dicom-web, basic auth (user ``node``) on free ports."""
    require_orthanc_dicomweb()
    with ohif.start_orthanc(tmp_path / "orthanc", users={USER: PASSWORD}) as server:
        yield server


def _stored_sop_uids(port: int) -> set[str]:
    """SOP Instance UIDs Orthanc holds, read through its REST API with the right credentials."""
    request = urllib.request.Request(f"http://{procs.LOOPBACK}:{port}/instances?expand")
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - a loopback test server
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in json.load(reply)}


def _destination(port: int, **auth: object) -> DestinationSettings:
    return DestinationSettings.model_validate({
        "name": "cloud", "type": "dicomweb", "url": f"http://{procs.LOOPBACK}:{port}/dicom-web",
        "auth": "basic", "username": USER, **auth,
    })


def test_stow_rs_stores_every_instance_and_reports_each(tmp_path: Path, orthanc: procs.Server) -> None:
    """STOW-RS with the password from a file: every file is stored at Orthanc, each instance's
    outcome is reported, and the endpoint check passes with the credentials."""
    files = series_files(tmp_path, "stow-direct")[:3]
    secret = tmp_path / "stow.password"
    secret.write_text(PASSWORD + "\n")
    dest = _destination(orthanc.port, password_file=str(secret))
    report = send_files(dest, files, calling_ae_title="DICOM_NODE")
    assert report.sent == 3 and all(r.status == 0 for r in report.results)
    assert {r.sop_instance_uid for r in report.results} <= _stored_sop_uids(orthanc.port)
    ok, why = reachable(dest, calling_ae_title="DICOM_NODE")
    assert ok, why


def test_wrong_password_fails_readably_without_the_secret(
    tmp_path: Path, orthanc: procs.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong password is a permanent failure naming the HTTP status and the destination, never
    the password; a missing variable says which; a stopped server is transient."""
    files = series_files(tmp_path, "stow-wrong")[:1]
    monkeypatch.setenv("STOW_PASSWORD", "not-the-password-123")
    dest = _destination(orthanc.port, password_env="STOW_PASSWORD")  # noqa: S106 - a variable name
    with pytest.raises(PermanentError, match=r"HTTP 401.*authentication refused") as refused:
        send_files(dest, files, calling_ae_title="DICOM_NODE")
    assert "not-the-password-123" not in str(refused.value) and PASSWORD not in str(refused.value)
    ok, why = reachable(dest, calling_ae_title="DICOM_NODE")
    assert not ok and "401" in why and "not-the-password-123" not in why
    monkeypatch.delenv("STOW_PASSWORD")
    ok, why = reachable(dest, calling_ae_title="DICOM_NODE")
    assert not ok and "STOW_PASSWORD" in why and "is not set" in why
    orthanc.proc.kill()  # gone, as after a crash (an orderly Orthanc stop takes 3 s)
    orthanc.proc.wait(10)
    monkeypatch.setenv("STOW_PASSWORD", PASSWORD)
    with pytest.raises(TransientError, match="unreachable"):
        send_files(dest, files, calling_ae_title="DICOM_NODE")


def test_a_busy_server_is_asked_once_per_delivery_attempt(tmp_path: Path) -> None:
    """HTTP 503 is transient and the request is sent once: ``[delivery]`` retries with its own
    backoff and count (dicomweb-client's own retries, 2 + 4 + 8 + 16 s, are off)."""
    posts: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((procs.LOOPBACK, 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = DestinationSettings.model_validate({
            "name": "busy", "type": "dicomweb", "url": f"http://{procs.LOOPBACK}:{server.server_port}/dicom-web",
        })
        with pytest.raises(TransientError, match="HTTP 503"):
            send_files(dest, series_files(tmp_path, "stow-busy")[:1], calling_ae_title="DICOM_NODE")
        assert posts == ["/dicom-web/studies/" + _study_of(tmp_path / "stow-busy")]
    finally:
        server.shutdown()
        server.server_close()


def _study_of(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


@pytest.mark.slow
def test_a_job_delivers_its_seg_and_sr_with_stow_rs(tmp_path: Path, orthanc: procs.Server) -> None:
    """End to end: C-STORE in, the job's SEG and SR stored at Orthanc by STOW-RS, job done."""
    secret = tmp_path / "stow.password"
    secret.write_text(PASSWORD)
    cloud = {"name": "cloud", "type": "dicomweb", "url": f"http://{procs.LOOPBACK}:{orthanc.port}/dicom-web",
             "auth": "basic", "username": USER, "password_file": str(secret)}
    workdir = tmp_path / "node"
    node = start_node(workdir, node_config(workdir, idle_seconds=0.5, destinations=[cloud],
                                            rules=[rule("ct", "ct-tissue", ["cloud"])]))
    try:
        files = series_files(tmp_path, "stow-e2e")
        storescu(node.port, files)
        from dicom_node.demo import SeriesInfo

        job = wait_job(node, catalog_of(node), SeriesInfo(seed="stow-e2e").uid("series"), ("done", "failed"))
        assert job.state == "done", job.reason
        results = {job.results["seg_sop_instance_uid"], job.results["sr_sop_instance_uid"]}
        wait_until(lambda: results <= _stored_sop_uids(orthanc.port), 20, what="SEG and SR at Orthanc")
    finally:
        node.stop()
