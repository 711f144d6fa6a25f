"""Transport tuning on live associations from unmodified DCMTK senders (Nagle left on)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dicom_node.demo import ChestSpec, SeriesInfo, write_chest_series
from dicom_node.dimse import TCP_QUICKACK
from dicom_node.ingest.events import AssociationSummary, StoredInstance
from dicom_node.ingest.listener import Listener
from dicom_node.ingest.spool import Spool
from dicom_node.settings import ListenerSettings, StorageSettings
from tests.conftest import require_tool
from tests.support import procs
from tests.support.sinks import CollectingSink

pytestmark = pytest.mark.integration


class HoldingSink(CollectingSink):
    """Holds the first C-STORE inside the association until the test has looked at the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.release = threading.Event()

    def instance_stored(self, instance: StoredInstance) -> None:
        super().instance_stored(instance)
        self.arrived.set()
        self.release.wait(20)

    def association_ended(self, summary: AssociationSummary) -> None:
        super().association_ended(summary)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Forty small CT slices (so the per-instance cost of a stall dominates)."""
    _, paths = write_chest_series(
        tmp_path_factory.mktemp("series"),
        ChestSpec(rows=32, columns=32, slices=40),
        SeriesInfo(
            study_uid="1.2.826.0.1.3680043.8.498.99", series_uid="1.2.826.0.1.3680043.8.498.99.1"
        ),
    )
    return sorted(paths)


def _listener(tmp_path: Path, sink: CollectingSink) -> Listener:
    # The sink is told on the association's own thread, so a sink that holds the C-STORE holds
    # the association open while its socket is inspected.
    storage = StorageSettings(root=tmp_path / "spool", min_free_mb=0)
    listener = Listener(
        ListenerSettings(port=procs.free_port()), Spool(storage.root), sink, storage
    )
    listener.start()
    return listener


def test_accepted_socket_has_nodelay_and_quickack(tmp_path: Path, series: list[Path]) -> None:
    """During a live storescu association the server socket has TCP_NODELAY and TCP_QUICKACK."""
    require_tool("storescu")
    sink = HoldingSink()
    listener = _listener(tmp_path, sink)
    try:
        proc = subprocess.Popen(
            ["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(listener.port), str(series[0])],
            env=procs.dcmtk_env(nodelay=False),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert sink.arrived.wait(20), "no C-STORE arrived"
            sockets = listener.active_sockets()
            assert len(sockets) == 1
            sock = sockets[0]
            assert sock.getpeername()[0] == "127.0.0.1"
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            if TCP_QUICKACK is not None:
                # Linux reports "quick-ACK mode now"; a weak signal on its own (the kernel may
                # be in it anyway), so the timing test below is the behavioural proof.
                assert sock.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) != 0
        finally:
            sink.release.set()
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode(errors="replace")
        assert len(sink.instances) == 1
    finally:
        listener.stop()


def _send_seconds(port: int, ae_title: str, files: list[Path]) -> float:
    start = time.perf_counter()
    res = procs.run_tool(
        ["storescu", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)], nodelay=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return time.perf_counter() - start


def test_unmodified_storescu_does_not_stall_per_instance(
    tmp_path: Path, series: list[Path]
) -> None:
    """A Nagle-ing storescu sends to the node without the ~40 ms delayed-ACK stall per instance."""
    require_tool("storescu", "storescp")
    sink = CollectingSink()
    listener = _listener(tmp_path, sink)
    stock = procs.start_storescp(tmp_path / "stock", nodelay=False)
    try:
        node_s = _send_seconds(listener.port, "DICOM_NODE", series)
        stock_s = _send_seconds(stock.port, "ARCHIVE", series)
    finally:
        stock.stop()
        listener.stop()
    assert len(sink.instances) == len(series)
    # Stock storescp pays ~40 ms per instance here (the delayed ACK); the node must not.
    assert stock_s / len(series) > 0.025, f"stock storescp unexpectedly fast ({stock_s:.2f} s)"
    assert node_s * 2 < stock_s, f"node {node_s:.2f} s vs stock storescp {stock_s:.2f} s"
