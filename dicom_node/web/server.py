"""Run the web app with uvicorn in a background thread of the node process (start/stop, port 0)."""

from __future__ import annotations

import socket
import threading
import time

import structlog
import uvicorn
from fastapi import FastAPI

from dicom_node.errors import DicomNodeError

log = structlog.get_logger(__name__)


class WebServerError(DicomNodeError):
    """The web server could not bind its port or did not come up."""


class WebServer:
    """uvicorn serving ``app`` on ``host:port`` from a daemon thread.

    The socket is bound in :meth:`start` on the caller's thread, so a busy port fails there with
    a readable error, and ``port=0`` gives a free port readable from :attr:`port` at once.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._port is None:
            raise WebServerError("the web server is not started, so it has no port yet")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind, start serving and wait until uvicorn accepts connections."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise WebServerError(
                f"web server cannot listen on {self.host}:{self.requested_port}: {exc} "
                f"(change [web] port or host)"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._port = int(sock.getsockname()[1])
        # lifespan off: the app has no start-up hooks; logging stays with structlog (no access log).
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="web-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise WebServerError(
                    f"web server on {self.host}:{self.port} exited during start-up"
                )
            if time.monotonic() > deadline:
                raise WebServerError(
                    f"web server on {self.host}:{self.port} did not start within {timeout:g} s"
                )
            time.sleep(0.02)
        log.info("web_server_started", host=self.host, port=self.port)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait for the thread and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        log.info("web_server_stopped", port=self._port)

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
