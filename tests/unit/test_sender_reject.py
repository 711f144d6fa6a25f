"""The sender reports an archive's A-ASSOCIATE-RJ reason, also when the archive closes at once.

The peer is a raw socket speaking the protocol: it reads the A-ASSOCIATE-RQ PDU, answers with
an A-ASSOCIATE-RJ PDU and closes the connection without waiting, as DCMTK's ``storescp
--refuse`` does.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicom_node._compat.pynetdicom import TunedAE, TunedAssociationSocket
from dicom_node.delivery import dicom as sender
from dicom_node.demo import (
    ChestSpec,
    SeriesInfo,
    make_chest_phantom,
    slice_datasets,
    write_datasets,
)
from dicom_node.errors import TransientError
from dicom_node.settings import DestinationSettings

CT = "1.2.840.10008.5.1.4.1.1.2"
A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_RJ_TYPE = 0x03
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
CALLED_AE_TITLE_NOT_RECOGNISED = 0x07
REJECT_MESSAGE = (
    r"rejected the association \(rejected transient, source service user: "
    r"called ae title not recognised\)"
)
#: Upper bound on waiting for the reactor to close the socket (guards against a hang only).
CLOSE_WAIT_S = 30.0


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data


@dataclass
class RejectingPeer:
    """A raw-socket acceptor that rejects every association and closes straight away."""

    port: int
    #: PDU type of every request read before rejecting it.
    requests: list[int] = field(default_factory=list)


def _reject_forever(listener: socket.socket, peer: RejectingPeer) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # the listener was closed: the test is over
            return
        with conn:
            pdu_type, _, length = struct.unpack(">BBL", _recv_exactly(conn, 6))
            _recv_exactly(conn, length)
            peer.requests.append(pdu_type)
            # PS3.8 9.3.4: type, reserved, length 4, reserved, result, source, reason.
            conn.sendall(struct.pack(
                ">BBLBBBB", A_ASSOCIATE_RJ_TYPE, 0, 4, 0,
                REJECTED_TRANSIENT, SOURCE_SERVICE_USER, CALLED_AE_TITLE_NOT_RECOGNISED,
            ))
        # Closed here, without waiting for the requestor to read the reject.


@pytest.fixture
def rejecting_peer() -> Iterator[RejectingPeer]:
    """A :class:`RejectingPeer` on a free loopback port, stopped in teardown."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = RejectingPeer(listener.getsockname()[1])
    thread = threading.Thread(target=_reject_forever, args=(listener, peer), daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(CLOSE_WAIT_S)


def _dest(peer: RejectingPeer) -> DestinationSettings:
    return DestinationSettings(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=peer.port)


class _ReadyAfterClose(threading.Event):
    """The "transport ready" event of :class:`_LateRequestorSocket`."""

    def __init__(self, sock: _LateRequestorSocket) -> None:
        super().__init__()
        self._sock = sock

    def wait(self, timeout: float | None = None) -> bool:
        ready = super().wait(timeout)
        # Hold the requesting thread until the reactor has handled the reject and closed.
        self._sock.closed_before_check = self._sock.closed.wait(CLOSE_WAIT_S)
        return ready


class _LateRequestorSocket(TunedAssociationSocket):
    """A tuned socket whose requesting thread wakes only after the reject closed the socket.

    This forces the interleaving a loaded machine produces by chance: the reactor thread
    connects, sends the A-ASSOCIATE-RQ, receives the A-ASSOCIATE-RJ and closes the socket
    while the thread that asked for the association is still descheduled.
    """

    def __init__(self, assoc: Association, address: AddressInformation) -> None:
        super().__init__(assoc, address=address)
        self.closed = threading.Event()
        self.closed_before_check = False
        self._ready = _ReadyAfterClose(self)

    def close(self) -> None:
        super().close()
        self.closed.set()


class _LateRequestorAE(TunedAE):
    """A :class:`TunedAE` whose associations use :class:`_LateRequestorSocket`."""

    socket_type = _LateRequestorSocket

    def __init__(self) -> None:
        super().__init__(ae_title="DICOM_NODE")
        self.sockets: list[AssociationSocket] = []

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        self.sockets.append(sock)
        return sock


def test_reject_then_close_gives_reason(tmp_path: Path, rejecting_peer: RejectingPeer) -> None:
    """send_instances raises TransientError naming the result, source and reason of the reject."""
    phantom = make_chest_phantom(ChestSpec(rows=16, columns=16, slices=1))
    paths = write_datasets(
        slice_datasets(phantom.hu, phantom.affine, SeriesInfo(
            study_uid="1.2.826.0.1.3680043.8.498.89", series_uid="1.2.826.0.1.3680043.8.498.89.1"
        )),
        tmp_path,
    )
    with pytest.raises(TransientError, match=REJECT_MESSAGE):
        sender.send_instances(
            _dest(rejecting_peer), paths, calling_ae_title="DICOM_NODE", timeout=CLOSE_WAIT_S
        )
    assert rejecting_peer.requests == [A_ASSOCIATE_RQ_TYPE]


def test_reject_handled_before_requestor_wakes_gives_reason(
    rejecting_peer: RejectingPeer,
) -> None:
    """A reject the reactor handled and closed before the requestor looked is still reported."""
    ae = _LateRequestorAE()
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = CLOSE_WAIT_S
    with pytest.raises(TransientError, match=REJECT_MESSAGE):
        sender._associate(ae, _dest(rejecting_peer), [build_context(CT)])
    [sock] = ae.sockets
    assert isinstance(sock, _LateRequestorSocket)
    assert sock.closed_before_check, "the reject did not close the socket before the check"
    assert rejecting_peer.requests == [A_ASSOCIATE_RQ_TYPE]

