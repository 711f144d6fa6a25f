"""The real OHIF Viewer against a real Orthanc, for browser tests.

* :func:`ohif_dist` gives the built viewer: the ``dist/`` folder of the npm package
  ``@ohif/app`` (version and sha512 pinned below), fetched with ``npm pack`` (its dependencies
  are not needed: ``dist/`` is the complete, bundled web app, and several of the packages it
  lists are not published on npm, so ``npm ci`` cannot install it).  ``make viewer`` and
  ``.ci/run`` run ``python -m tests.support.ohif`` once; the tests reuse the unpacked copy.
* :func:`start_orthanc` runs Orthanc with the Debian ``orthanc-dicomweb`` plugin on free ports.
* :class:`ViewerServer` serves the viewer plus an ``app-config.js`` whose DICOMweb data source
  is ``/dicom-web`` on the same origin, which it proxies to Orthanc (no CORS involved).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support import procs

REPO = Path(__file__).resolve().parents[2]
VIEWER_DIR = REPO / "tests" / "viewer"
OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
#: ``dist.integrity`` of @ohif/app@3.13.2 on registry.npmjs.org.
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_DIST = VIEWER_DIR / "ohif" / OHIF_VERSION / "dist"

DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_ohif_dist() -> Path:
    """Unpack ``@ohif/app``'s ``dist/`` into tests/viewer/ohif/<version>/ (once)."""
    if (OHIF_DIST / "index.html").is_file():
        return OHIF_DIST
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is needed to fetch the OHIF Viewer")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", tmp, "--silent"],
            check=True,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        got = _integrity(tarball)
        if got != OHIF_INTEGRITY:
            raise RuntimeError(f"{tarball.name}: integrity {got} != pinned {OHIF_INTEGRITY}")
        staging = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(staging, filter="data")
        target = OHIF_DIST.parent
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.move(str(staging / "package" / "dist"), str(OHIF_DIST))
        shutil.copy(staging / "package" / "LICENSE", target / "LICENSE")
    return OHIF_DIST


def dicomweb_plugin() -> str | None:
    """The orthanc-dicomweb plugin's shared library, if installed."""
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return None


@contextmanager
def start_orthanc(
    workdir: Path, users: dict[str, str] | None = None, extra: dict[str, object] | None = None
) -> Iterator[procs.Server]:
    """Orthanc with the DICOMweb plugin on free loopback ports (``/dicom-web/``); HTTP basic
    authentication for ``users`` (name -> password) when given, else none; ``extra``: more
    configuration options (e.g. ``OverwriteInstances``)."""
    plugin = dicomweb_plugin()
    if plugin is None:
        raise FileNotFoundError("orthanc-dicomweb plugin not installed")
    http_port, dicom_port = procs.free_port(), procs.free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "dicom-node-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        **(extra or {}),
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        ["Orthanc", str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
    )
    log.close()
    server = procs.Server(proc, http_port, workdir, workdir / "orthanc.log")
    try:
        procs.wait_for_port(http_port, proc=proc, timeout=30.0)
        yield server
    finally:
        # SIGKILL: a throwaway archive in a temporary folder; Orthanc's orderly stop took 3 s.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def orthanc_upload(port: int, data: bytes) -> dict[str, str]:
    """POST one DICOM file to Orthanc's REST API; returns its answer (ID, status...)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/instances",
        data=data,
        method="POST",
        headers={"Content-Type": "application/dicom"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (http to loopback)
        result: dict[str, str] = json.loads(answer.read())
    return result


def app_config(origin: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, same-origin, no tour or dialogs."""
    root = f"{origin}/dicom-web"
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (test)",
                    "name": "orthanc",
                    "wadoUriRoot": root,
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _Handler(BaseHTTPRequestHandler):
    server: _ViewerHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=60)
        headers = {
            k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type", "range", "accept-encoding")
        }
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() in ("content-type", "content-encoding", "etag", "last-modified"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()
        self.server.requests.append((self.command, self.path, answer.status))

    def _static(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            data = self.server.config_js.encode()
            kind = "application/javascript"
        else:
            file = (self.server.dist / path.lstrip("/")).resolve()
            if not file.is_file() or self.server.dist not in file.parents:
                file = self.server.dist / "index.html"  # client-side routes (/viewer?...)
            data = file.read_bytes()
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if file.suffix == ".wasm":
                kind = "application/wasm"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        # SharedArrayBuffer for the codecs' workers (OHIF documents these two headers).
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self._static()

    def do_POST(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self.send_error(405)


class _ViewerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    dist: Path
    config_js: str
    orthanc_port: int
    requests: list[tuple[str, str, int]]


class ViewerServer:
    """OHIF's dist/ + app-config.js + a same-origin ``/dicom-web`` proxy to Orthanc."""

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        self.port = procs.free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.httpd = _ViewerHTTPServer(("127.0.0.1", self.port), _Handler)
        self.httpd.dist = dist.resolve()
        self.httpd.config_js = app_config(self.origin)
        self.httpd.orthanc_port = orthanc_port
        self.httpd.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        return self.httpd.requests

    def __enter__(self) -> ViewerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    print(fetch_ohif_dist())
    sys.exit(0)
