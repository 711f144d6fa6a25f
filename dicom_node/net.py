"""Transport tuning for pynetdicom, through its extension points (no library file is edited).

Why: DCMTK and Orthanc keep Nagle's algorithm on unless ``TCP_NODELAY=1`` is in their
environment, and write each C-STORE message as two small writes, so every message waits for our
delayed ACK (~40 ms per instance; see ``BENCHMARKING.md``).  A receiver defends itself by
setting ``TCP_NODELAY`` on every accepted socket and re-arming ``TCP_QUICKACK`` before each
``recv`` (Linux clears it after use), and by sending each PDU in one call.

What is here:

* :func:`tune_socket` / :func:`arm_quickack`: the socket options (skipped where they do not exist).
* :class:`TunedAssociationSocket`: options on connect, ``TCP_QUICKACK`` before every ``recv``,
  reads straight into one buffer per PDU (pynetdicom reads 4 KiB pieces), one ``sendall`` per
  PDU, and a ``ready`` that *blocks* in ``poll`` on the socket and a wake-up ``eventfd``.
* :class:`TunedDUL`: the DICOM upper layer with a loop delay of 0 - it no longer sleeps 1 ms
  per message, it waits in ``poll`` and is woken when the service user queues a PDU to send.
* :class:`TunedAssociation`: the acceptor's reactor waits on an event set when the upper layer
  delivers a message, instead of polling with a 1 ms sleep (one sleep per C-STORE, measured
  ~1 ms per instance on the critical path); pynetdicom's per-PDU debug log handlers unbound.
* :class:`TunedDIMSE` / :func:`encode_c_store_rsp`: the C-STORE response command set encoded
  by hand (pynetdicom builds it through pydicom: ~1 ms per instance here).
* :class:`TunedAssociationServer` / :class:`TunedRequestHandler`: the SCP side (options on
  accept, the TLS handshake moved off the accept thread, tuned socket and DUL per association).
* :class:`TunedAE`: the SCU side (``ae.associate`` uses the tuned socket and DUL).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import select
import socket
import ssl
import struct
import threading
import weakref
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, cast

from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.dimse_primitives import DimsePrimitiveType
    from pynetdicom.pdu_primitives import _PDUPrimitiveType

#: ``TCP_QUICKACK`` exists on Linux only; elsewhere delayed ACKs cannot be switched off per recv.
TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)
_HAS_EVENTFD: Final = hasattr(os, "eventfd")
#: Longest time the DUL thread blocks in ``poll`` before re-checking its timers and kill flag.
POLL_INTERVAL_MS: Final = 20
#: Largest single ``recv``; big PDUs are read in few system calls instead of 4 KiB pieces.
_RECV_CHUNK: Final = 1 << 20


def arm_quickack(sock: socket.socket) -> None:
    """Ask Linux to ACK the next segments at once (it clears the flag again after use)."""
    if TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


def tune_socket(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` and arm ``TCP_QUICKACK`` on a connected TCP socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    arm_quickack(sock)


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after every ``put`` (wakes whoever waits for its items)."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


def _wake_reactor(assoc: Association) -> None:
    wake = getattr(assoc, "reactor_wake", None)
    if wake is not None:
        wake.set()


class TunedDUL(DULServiceProvider):
    """A DUL provider that waits in ``poll`` instead of sleeping ``_run_loop_delay`` per loop."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        # Primitives for the service user (A-RELEASE, A-ABORT...) wake a TunedAssociation reactor.
        ref = weakref.ref(assoc)
        self.to_user_queue = _NotifyingQueue(lambda: _wake_reactor(a) if (a := ref()) else None)
        # The wake-up fd lets another thread interrupt the poll in TunedAssociationSocket.ready.
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.wake_fd)
        # The loop still calls time.sleep(0) when idle; the wait happens in ``ready``.
        self._run_loop_delay = 0.0

    def wake(self) -> None:
        """Interrupt the reactor's ``poll`` (a PDU was queued, or the thread must stop)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake_fd, 1)

    def send_pdu(self, primitive: _PDUPrimitiveType) -> None:
        """Queue ``primitive`` to be sent and wake the reactor so it goes out at once."""
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        """Stop the reactor thread (woken, not left to time out)."""
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if in Sta1 and join it (the base class spins with loop delay 0)."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True


def _ui_element(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def encode_c_store_rsp(rsp: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set (Implicit VR Little Endian) of ``rsp``, or None if unusual.

    Byte for byte what pynetdicom encodes through pydicom, for the common response: Status,
    message id and the two UIDs.  Returns None (let pynetdicom encode it) when the response
    carries an Error Comment or Offending Element, or a UID is not plain ASCII.
    """
    if rsp.Status is None or rsp.MessageIDBeingRespondedTo is None:
        return None
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    try:
        body = b"".join((
            _ui_element(0x0002, str(rsp.AffectedSOPClassUID))
            if rsp.AffectedSOPClassUID else b"",
            struct.pack("<HHIH", 0x0000, 0x0100, 2, 0x8001),  # Command Field: C-STORE-RSP
            struct.pack("<HHIH", 0x0000, 0x0120, 2, rsp.MessageIDBeingRespondedTo),
            struct.pack("<HHIH", 0x0000, 0x0800, 2, 0x0101),  # no data set
            struct.pack("<HHIH", 0x0000, 0x0900, 2, rsp.Status),
            _ui_element(0x1000, str(rsp.AffectedSOPInstanceUID))
            if rsp.AffectedSOPInstanceUID else b"",
        ))
    except (UnicodeEncodeError, struct.error):
        return None
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


class TunedDIMSE(DIMSEServiceProvider):
    """DIMSE provider: wakes the association reactor per message, fast C-STORE responses."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        ref = weakref.ref(assoc)
        self.msg_queue = _NotifyingQueue(lambda: _wake_reactor(a) if (a := ref()) else None)

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        """Send a DIMSE message; a plain C-STORE-RSP skips pynetdicom's pydicom encoding."""
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            # Somebody wants the message object: let pynetdicom build it.
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_c_store_rsp(primitive)
            max_pdu = self.maximum_pdu_size
            if command is not None and (not max_pdu or len(command) + 6 <= max_pdu):
                pdata = P_DATA()
                # 0x03: command, last fragment (PS3.8 E.2).
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class TunedAssociation(Association):
    """An acceptor :class:`Association` whose reactor is woken by events, not a 1 ms sleep."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        #: Set when the upper layer hands the reactor something (message, release, abort).
        self.reactor_wake = threading.Event()
        super().__init__(ae, mode)
        self.dimse = TunedDIMSE(self)
        if _config.LOG_HANDLER_LEVEL == "standard":
            # pynetdicom's per-PDU/per-message debug logging costs time on every message
            # (stdlib logging, not ours; the listener logs what matters).
            for event, handler in (
                (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
                (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
            ):
                self.unbind(event, handler)

    def kill(self) -> None:
        """Stop the reactor (woken at once rather than at its next timeout)."""
        self.reactor_wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        # Association._run_reactor (pynetdicom 3.0) with ``time.sleep(0.001)`` replaced by a
        # wait on ``reactor_wake``; the timeout keeps the DUL-alive and idle-timer checks.
        self._is_paused = False
        wake = self.reactor_wake
        idle = False
        while not self._kill:
            if idle:
                wake.wait(POLL_INTERVAL_MS / 1000)
            wake.clear()

            # The user may pause the reactor to use the send_*() methods (see the base class).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            idle = msg is None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _RecordingSocket(socket.socket):
    """A TCP socket that remembers why ``connect`` failed (pynetdicom only logs it)."""

    connect_error: OSError | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = exc
            raise


class TunedAssociationSocket(AssociationSocket):
    """An :class:`AssociationSocket` with Nagle off, quick ACKs and event-driven reads."""

    #: Why the last ``connect`` failed (refused, timed out...), for readable sender errors.
    connect_error: OSError | None = None

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        # As the base class, with a socket that records connect errors.
        sock = _RecordingSocket(address.address_family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.assoc.network_timeout is not None:
            sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        return sock

    def connect(self, primitive: Any) -> None:
        """Connect (as SCU) and tune the new connection."""
        raw = self.socket
        super().connect(primitive)
        if self.socket is not None and self._is_connected:
            tune_socket(self.socket)
        elif isinstance(raw, _RecordingSocket):
            self.connect_error = raw.connect_error

    @property
    def ready(self) -> bool:
        """True when data can be read; blocks up to ``POLL_INTERVAL_MS`` or until woken."""
        sock = self.socket
        dul = self.assoc.dul
        wake_fd = dul.wake_fd if isinstance(dul, TunedDUL) else None
        if sock is None or not self._is_connected:
            if wake_fd is not None:
                # Nothing to read: wait for a wake-up rather than spin with loop delay 0.
                select.select([wake_fd], [], [], POLL_INTERVAL_MS / 1000)
                self._drain(wake_fd)
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        fd = sock.fileno()
        if fd < 0:
            self.event_queue.put("Evt17")
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        try:
            events = poller.poll(POLL_INTERVAL_MS if wake_fd is not None else 0)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")
            return False
        readable = False
        for ready_fd, _mask in events:
            if ready_fd == wake_fd:
                self._drain(ready_fd)
            else:
                # POLLHUP/POLLERR count as readable: recv() then reports the closed connection.
                readable = True
        return readable

    @staticmethod
    def _drain(wake_fd: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_read(wake_fd)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only when the peer closed), quick-ACKing each read."""
        sock = self.socket
        assert sock is not None  # the DUL only reads from a connected socket
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                arm_quickack(sock)
                n = sock.recv_into(view[got:], min(nr_bytes - got, _RECV_CHUNK))
                if n == 0:
                    break
                got += n
        if got < nr_bytes:
            del buf[got:]
        return buf

    def send(self, bytestream: bytes) -> None:
        """Send one encoded PDU with a single ``sendall``."""
        sock = self.socket
        try:
            assert sock is not None
            sock.sendall(bytestream)
            evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:
            # Same contract as the base class: a failed send is a closed transport (Evt17).
            self.event_queue.put("Evt17")


def install_tuned_dul(assoc: Association) -> None:
    """Replace the (not yet started) DUL of ``assoc`` with a :class:`TunedDUL`."""
    if not _HAS_EVENTFD or assoc.dul.socket is not None or assoc.dul.is_alive():
        return
    assoc.dul = TunedDUL(assoc)
    # The timers live on the DUL: apply the association's timeouts to the new one.
    assoc.acse_timeout = assoc.acse_timeout
    assoc.network_timeout = assoc.network_timeout


class TunedRequestHandler(RequestHandler):
    """Creates each acceptor association with the tuned socket and DUL."""

    def handle(self) -> None:
        """Finish the TLS handshake in this association's thread, then run the association."""
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(self.ae.acse_timeout)
                self.request.do_handshake()
                self.request.settimeout(None)
            except (OSError, ValueError) as exc:
                server = self.server
                if isinstance(server, TunedAssociationServer) and server.on_tls_error:
                    server.on_tls_error(self.client_address, exc)
                return
        super().handle()

    def _create_association(self) -> Association:
        # Mirrors RequestHandler._create_association (pynetdicom 3.0) with the tuned classes:
        # the socket class is not a parameter there.
        assoc = TunedAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        install_tuned_dul(assoc)

        sock = TunedAssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], self.server._handlers[event]):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class TunedAssociationServer(ThreadedAssociationServer):
    """Threaded association server that tunes every accepted socket before anything else."""

    #: Called with (client address, exception) when a TLS handshake fails.
    on_tls_error: Any = None
    #: Set ``SO_REUSEPORT`` so several processes can share the port (the kernel spreads new
    #: connections over them; one Python process is bound to one core by the GIL).
    reuse_port: bool = False

    def server_bind(self) -> None:
        """Bind as pynetdicom does, plus ``SO_REUSEPORT`` when :attr:`reuse_port` is set."""
        if self.reuse_port and self.socket is not None and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection, set the socket options, wrap TLS without handshaking here."""
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        tune_socket(client_socket)
        if self.ssl_context:
            # The handshake runs in the association thread (TunedRequestHandler.handle), so a
            # slow or silent TLS client cannot stall the accept loop for everybody else.
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address


#: Implementation Class UID and Version Name the node sends in A-ASSOCIATE (as SCP and SCU) and
#: writes into the file meta of spooled and result files.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    int.from_bytes(hashlib.sha256(b"dicom-node implementation class").digest()[:16], "big")
)
IMPLEMENTATION_VERSION_NAME = "DICOM_NODE_01"


class TunedAE(ApplicationEntity):
    """An :class:`ApplicationEntity` whose associations (as SCU) use the tuned transport."""

    def __init__(self, ae_title: str = "DICOM_NODE") -> None:
        super().__init__(ae_title=ae_title)
        self.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.implementation_version_name = IMPLEMENTATION_VERSION_NAME

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        install_tuned_dul(assoc)
        sock = TunedAssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock

    def start_tuned_server(
        self,
        address: tuple[str, int],
        *,
        ae_title: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        reuse_port: bool = False,
    ) -> TunedAssociationServer:
        """Like ``start_server(address, block=False)`` with the tuned server and handler."""
        server_class = _ReusePortServer if reuse_port else TunedAssociationServer
        server = cast(TunedAssociationServer, self.make_server(
            address,
            ae_title=ae_title,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=server_class,
            request_handler=TunedRequestHandler,
        ))
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},  # shutdown() waits up to one interval
            name=f"AcceptorServer@{address[1]}",
            daemon=True,
        )
        thread.start()
        self._servers.append(server)
        return server


class _ReusePortServer(TunedAssociationServer):
    reuse_port = True
