"""pynetdicom, tuned and patched: every private name of pynetdicom the node relies on is here.

The SCU transport (no library file is edited; the subclasses override private methods):

* :class:`TunedAssociationSocket`: socket options on connect (:func:`dicom_node.dimse.tune_socket`),
  ``TCP_QUICKACK`` before every ``recv``, reads straight into one buffer per PDU (pynetdicom reads
  4 KiB pieces), one ``sendall`` per PDU, and a ``ready`` that *blocks* in ``poll`` on the socket
  and a wake-up ``eventfd``.
* :class:`TunedDUL`: the DICOM upper layer with a loop delay of 0 - it no longer sleeps 1 ms
  per message, it waits in ``poll`` and is woken when the service user queues a PDU to send.
* :class:`TunedAE`: ``ae.associate`` uses the tuned socket and DUL, and a
  :class:`ReactorCheckpoint` that closes a race of pynetdicom's in which the association's
  reactor thread takes a response meant for the request being sent.

And two helpers for the C-STORE SCU: :func:`send_files_as_stored_bytes` (the process-global
``pynetdicom._config`` flag) and :func:`queued_associate_reply` (``DULServiceProvider.peek_next_pdu``).

The private names used, checked by ``tests/unit/test_compat.py``: ``DULServiceProvider._run_loop_delay``,
``._kill_thread``, ``.peek_next_pdu``; ``AssociationSocket._create_socket``, ``._is_connected``,
``.event_queue``, ``.tls_args``; ``ApplicationEntity._create_socket``;
``Association._reactor_checkpoint``, ``._is_paused``;
``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

from pynetdicom import _config, evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
)

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.pdu_primitives import _PDUPrimitiveType

from dicom_node.dimse import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    arm_quickack,
    tune_socket,
)

_HAS_EVENTFD: Final = hasattr(os, "eventfd")
#: Longest time the DUL thread blocks in ``poll`` before re-checking its timers and kill flag.
POLL_INTERVAL_MS: Final = 20
#: Largest single ``recv``; big PDUs are read in few system calls instead of 4 KiB pieces.
_RECV_CHUNK: Final = 1 << 20


class TunedDUL(DULServiceProvider):
    """A DUL provider that waits in ``poll`` instead of sleeping ``_run_loop_delay`` per loop."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
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


class ReactorCheckpoint(threading.Event):
    """pynetdicom's ``Association._reactor_checkpoint``, whose ``wait`` returns to the reactor
    only once it has said "not paused" and the checkpoint is still set.

    Before each request (C-STORE, C-FIND, N-ACTION, release) pynetdicom pauses the association's
    reactor thread - ``clear()``, then it waits until the reactor says ``_is_paused`` - so the
    reactor cannot take the response off the DIMSE queue; after the response it ``set()``s the
    checkpoint again.  The reactor says ``_is_paused = True`` before ``wait()`` and False after
    it returns, with nothing in between: a pause that comes while the reactor is between the two
    (woken, or passing a set checkpoint, but not yet running: a loaded machine) sees True, the
    request goes out, and the reactor, running at last, takes its response as if it were a
    request.  The sender then waits ``dimse_timeout`` for nothing ("no C-STORE response (timed
    out or aborted)": seen once in about 40 runs of the killed-worker test under load, and by a
    C-FIND test beside it).  Here the reactor says "not paused" first and then looks again: a
    checkpoint cleared meanwhile sends it back to paused, so a pause is only ever answered by a
    reactor that is paused.

    Assumes the association answers a network timeout with A-ABORT (pynetdicom's default, which
    :func:`install_reactor_checkpoint` pins): its A-RELEASE answer releases from the reactor
    thread, which would then wait for itself to pause.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = weakref.ref(assoc)

    def _woken(self) -> None:
        """Called each time the underlying wait returns (tests delay the reactor here)."""

    def wait(self, timeout: float | None = None) -> bool:
        assoc = self._assoc()
        while True:
            woken = super().wait(timeout)
            self._woken()
            if assoc is None or not woken:
                return woken
            assoc._is_paused = False
            if self.is_set():
                return True
            assoc._is_paused = True  # cleared meanwhile: a pause is asked for, stay paused


def install_reactor_checkpoint(assoc: Association) -> None:
    """Give ``assoc`` (not yet started) a :class:`ReactorCheckpoint`, set as pynetdicom's is,
    and keep its answer to a network timeout at A-ABORT."""
    checkpoint = ReactorCheckpoint(assoc)
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    assoc.network_timeout_response = "A-ABORT"


class TunedAE(ApplicationEntity):
    """An :class:`ApplicationEntity` whose associations (as SCU) use the tuned transport."""

    #: The socket each association gets (a subclass of the tuned one).
    socket_type: type[TunedAssociationSocket] = TunedAssociationSocket

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
        install_reactor_checkpoint(assoc)
        sock = self.socket_type(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def send_files_as_stored_bytes() -> None:
    """Send datasets given by path as their raw bytes, never decoded and re-encoded (a documented
    pynetdicom setting, process-global; it only changes how path-based C-STORE requests are sent)."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def queued_associate_reply(assoc: Association) -> Any:
    """The PDU primitive waiting at the head of the DUL's queue to the user, without taking it
    (an A-ASSOCIATE reply pynetdicom missed, see ``dicom_node.delivery.dicom``), or None."""
    return assoc.dul.peek_next_pdu()
