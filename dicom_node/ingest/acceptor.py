"""A lean DICOM upper layer for the acceptor side: what a Storage + Verification SCP needs.

Why not pynetdicom's: its acceptor moves every PDU through a state machine thread, a queue, an
association thread polling with sleeps and a DIMSE layer that decodes each command through
pydicom - about 4 ms of Python per instance on this hardware, where DCMTK ``storescp`` needs
about 1 ms.  The listener has one job: take C-STORE and C-ECHO requests and answer them.  Here
one thread per association reads whole PDUs straight from the socket into few buffers, decodes
the few command elements by hand and writes the response in one ``sendall``.

pynetdicom still does the rare and intricate parts: decoding the A-ASSOCIATE-RQ, presentation
context and role negotiation (:func:`pynetdicom.presentation.negotiate_as_acceptor`) and
encoding the A-ASSOCIATE-AC.

Protocol (PS3.8 §9, the acceptor's path through the state machine of Table 9-10):

* an A-ASSOCIATE-RQ is awaited for ``acse_timeout`` (the ARTIM timer); a connection that closes
  first is dropped silently (port probes), anything else is aborted;
* the request is rejected (A-ASSOCIATE-RJ) for an unsupported protocol version or application
  context, a calling AE title not allowed, a wrong called AE title, or too many associations;
* then P-DATA-TF PDUs carry DIMSE messages (command fragments, then data set fragments on the
  same presentation context); C-ECHO and C-STORE are answered, so is N-EVENT-REPORT (an
  archive's Storage Commitment report, when the handler takes it), C-CANCEL is ignored, any
  other command gets 0x0211 (unrecognized operation);
* A-RELEASE-RQ is answered with A-RELEASE-RP; A-ABORT ends the association; an unexpected or
  malformed PDU, a PDV on a context that was not accepted, or silence for ``network_timeout``
  is answered with A-ABORT (source: service provider, with the reason code).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from dicom_node.dimse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, tune_socket
from dicom_node.ingest.connection import (
    Abort,
    Closed,
    Connection,
    DeadlineExceeded,
)
from dicom_node.ingest.pdu import (
    A_ABORT_PDU,
    A_ASSOCIATE_AC_PDU,
    A_ASSOCIATE_RQ_PDU,
    A_RELEASE_RP_PDU,
    A_RELEASE_RQ_PDU,
    ABORT_INVALID_PDU_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    N_EVENT_REPORT_RQ,
    NO_DATA_SET,
    P_DATA_TF_PDU,
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RP,
    UNRECOGNIZED_OPERATION,
    abort_pdu,
    decode_ae_title,
    decode_command,
    decode_text,
    decode_us,
    encode_response,
    p_data_pdus,
    reject_pdu,
)

APPLICATION_CONTEXT_NAME: Final = "1.2.840.10008.3.1.1.1"

_log = structlog.get_logger("dicom_node.ingest.acceptor")

#: ``accept()`` errors that mean "out of file descriptors or kernel memory": survived by
#: shedding connections not associated yet and backing off, never by ending the accept loop.
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept()`` errors about one connection only (it went away before it was accepted).
_TRANSIENT_ERRNOS: Final = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ENOPROTOOPT, errno.EOPNOTSUPP,
})
#: Back-off after a failed ``accept()``: from the first figure, doubling to the second.
_ACCEPT_BACKOFF: Final = (0.05, 1.0)
#: Readiness stays failed this long after the last failed ``accept()``.
_UNREADY_AFTER_FAILURE_S: Final = 5.0

#: Largest A-ASSOCIATE-RQ accepted by default (128 contexts x 13 syntaxes is 46 KiB).
_MAX_REQUEST_PDU: Final = 64 << 10
#: Cap on a P-DATA-TF PDU when our maximum PDU length is "unlimited" (0).
_MAX_DATA_PDU: Final = 64 << 20
#: Largest DIMSE command set (a C-STORE-RQ's is ~200 bytes).
_MAX_COMMAND: Final = 64 << 10


class AssociationRejected(Exception):
    """Raised by :meth:`ScpHandler.check` to reject an association request.

    ``result``/``source``/``reason`` are the A-ASSOCIATE-RJ fields (PS3.8 Table 9-21);
    ``text`` is the reason for logs.
    """

    def __init__(self, result: int, source: int, reason: int, text: str) -> None:
        super().__init__(text)
        self.result, self.source, self.reason, self.text = result, source, reason, text


@dataclass(frozen=True)
class AssociationRequest:
    """What the peer asked for, before the association is accepted."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int
    implementation_class_uid: str
    implementation_version_name: str


@dataclass(frozen=True)
class Context:
    """An accepted presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class Association:
    """An accepted association, handed to the :class:`ScpHandler` callbacks."""

    request: AssociationRequest
    contexts: dict[int, Context]
    #: The peer's Maximum Length Received (0 = unlimited): our P-DATA-TF PDUs stay below it.
    peer_max_pdu: int
    association_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    #: Set by the handler for its own per-association state.
    user_data: object = None

    @property
    def calling_ae_title(self) -> str:
        return self.request.calling_ae_title


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE request with its data set, exactly as received."""

    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    priority: int
    move_originator_ae_title: str | None
    context: Context
    #: The data set bytes as sent, in ``context.transfer_syntax``.
    dataset: bytes


@dataclass(frozen=True)
class EventReportRequest:
    """An N-EVENT-REPORT request (PS3.7 10.1.1), e.g. a Storage Commitment result."""

    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    event_type_id: int | None
    context: Context
    #: The Event Information bytes as sent, in ``context.transfer_syntax`` (None: no data set).
    dataset: bytes | None


class ScpHandler(Protocol):
    """What the acceptor calls; every call runs on the association's thread."""

    def check(self, request: AssociationRequest, active: int) -> None:
        """Raise :class:`AssociationRejected` to refuse; ``active`` counts the others running."""

    def accepted(self, assoc: Association) -> None: ...

    def rejected(self, request: AssociationRequest, rejection: AssociationRejected) -> None: ...

    def echo(self, assoc: Association) -> int: ...

    def store(self, assoc: Association, request: StoreRequest) -> tuple[int, str | None]:
        """Return the status and an optional Error Comment (at most 64 characters are sent)."""

    def event_report(self, assoc: Association, request: EventReportRequest) -> int:
        """Return the N-EVENT-REPORT-RSP status."""

    def ended(self, assoc: Association, released: bool, reason: str) -> None: ...

    def connection_failed(self, address: str, error: str) -> None:
        """A connection that never became an association (timeout, not DICOM)."""

    def tls_failed(self, address: str, error: str) -> None:
        """A TLS handshake failed (no or untrusted client certificate, old TLS version)."""


@dataclass(frozen=True)
class _Negotiated:
    """What an A-ASSOCIATE-RQ's variable items decide, kept for the next identical request.

    A sender proposes the same presentation contexts on every association (storescu: 120 of
    them, a 9.6 KB PDU that pynetdicom takes 5.6 ms to decode); only the fixed part (protocol
    version, AE titles) differs, and it is read from the bytes each time.
    """

    application_context: str
    peer_max_pdu: int
    implementation_class_uid: str
    implementation_version_name: str
    contexts: dict[int, Context]
    #: The variable items of our A-ASSOCIATE-AC, encoded.
    ac_items: bytes


#: Identical requests remembered per acceptor (distinct senders/configurations, not associations).
_NEGOTIATION_CACHE_SIZE: Final = 64
#: A-ASSOCIATE-RQ/AC body: protocol version, reserved, called AE, calling AE, reserved; then items.
_FIXED_PART: Final = 68


@dataclass(frozen=True)
class AcceptorConfig:
    """Protocol parameters of the acceptor."""

    #: SOP Class UID -> transfer syntaxes accepted for it.
    contexts: dict[str, tuple[str, ...]]
    #: SOP classes whose SCP/SCU Role Selection we agree to (either role for the requestor):
    #: Storage Commitment, where the archive opens the association as the SCP sending
    #: N-EVENT-REPORTs.
    role_classes: frozenset[str] = frozenset()
    #: Our Maximum Length Received (0 = unlimited).
    maximum_pdu_size: int = 0
    #: The whole A-ASSOCIATE-RQ must arrive within this many seconds of the connection.
    acse_timeout: float = 30.0
    #: The next PDU must arrive within this many seconds while no DIMSE message is under way.
    network_timeout: float | None = 60.0
    #: A DIMSE message must be complete within this many seconds of its first PDU's header
    #: (None: ``network_timeout`` per receive only).
    dimse_timeout: float | None = None
    #: Largest data set of one DIMSE message, bytes (0 = unlimited): more aborts.
    max_message_bytes: int = 0
    #: Connections not associated yet served at once; one more sheds the oldest.
    max_pending: int = 64
    #: Largest A-ASSOCIATE-RQ PDU (bytes of its body).
    max_request_pdu: int = _MAX_REQUEST_PDU


class _Message:
    """A DIMSE message being assembled from PDVs."""

    __slots__ = ("command", "context_id", "dataset", "fields", "size")

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        #: Bytes of the command set, then of the data set, received so far.
        self.size = 0
        self.command: list[bytes | memoryview] = []
        self.dataset: list[bytes | memoryview] | None = None
        self.fields: dict[int, bytes] = {}


class Acceptor:
    """Serves DICOM associations on a TCP (or TLS) port, one thread per association.

    Parameters
    ----------
    address : tuple[str, int]
        Where to listen (port 0 picks a free port; see :attr:`port`).
    config : AcceptorConfig
        Contexts, PDU size, timeouts.
    handler : ScpHandler
        Decides on requests and serves C-ECHO/C-STORE.
    ssl_context : ssl.SSLContext, optional
        Serve DICOM over TLS (the handshake runs on the association's thread).
    reuse_port : bool
        Bind with ``SO_REUSEPORT`` so several processes can share the port.
    """

    def __init__(
        self,
        address: tuple[str, int],
        config: AcceptorConfig,
        handler: ScpHandler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.handler = handler
        self.ssl_context = ssl_context
        self._supported: list[PresentationContext] = [
            build_context(abstract, list(syntaxes)) for abstract, syntaxes in config.contexts.items()
        ]
        for cx in self._supported:
            if cx.abstract_syntax in config.role_classes:
                cx.scu_role, cx.scp_role = True, True
        self._lock = threading.Lock()
        self._negotiated: OrderedDict[bytes, _Negotiated] = OrderedDict()
        self._active: dict[int, socket.socket] = {}
        #: Connections not associated yet, oldest first: id -> socket (see :meth:`_shed`).
        self._pending: OrderedDict[int, socket.socket] = OrderedDict()
        self._shed_ids: set[int] = set()
        self._shed_logged_at, self._shed_unlogged = -1e9, 0
        self._next_id = 0
        self._established = 0
        self._closing = False
        self._stopped = threading.Event()
        #: monotonic time of the last successful and of the last failed ``accept()``.
        self._last_accept = time.monotonic()
        self._last_failure = -1e9
        self._failure = ""
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()

    def _remembered(self, key: bytes) -> _Negotiated | None:
        with self._lock:
            found = self._negotiated.get(key)
            if found is not None:
                self._negotiated.move_to_end(key)
            return found

    def _remember(self, key: bytes, negotiated: _Negotiated) -> None:
        with self._lock:
            self._negotiated[key] = negotiated
            while len(self._negotiated) > _NEGOTIATION_CACHE_SIZE:
                self._negotiated.popitem(last=False)

    @property
    def port(self) -> int:
        """The TCP port bound."""
        return int(self._sock.getsockname()[1])

    @property
    def closing(self) -> bool:
        """True once :meth:`shutdown` has begun."""
        return self._closing

    def active_sockets(self) -> list[socket.socket]:
        """The sockets of the connections being served now."""
        with self._lock:
            return list(self._active.values())

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, abort the running associations and wait for their threads."""
        with self._lock:
            self._closing = True
            running = list(self._active.items())
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout)
        for _, sock in running:
            with contextlib.suppress(OSError):
                sock.sendall(abort_pdu(ABORT_NOT_SPECIFIED))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in [t for t in threading.enumerate() if t.name.startswith("dicom-assoc-")]:
            if getattr(thread, "acceptor", None) is self:
                thread.join(timeout)

    # -- accept ----------------------------------------------------------------------------------
    def accepting(self) -> tuple[bool, str]:
        """Whether new connections are being accepted, and why not (for readiness probes).

        Not while the accept thread is gone, nor while ``accept()`` fails (out of file
        descriptors: EMFILE/ENFILE, out of kernel memory: ENOBUFS/ENOMEM) and for
        ``_UNREADY_AFTER_FAILURE_S`` after its last failure.
        """
        if self._closing:
            return False, "the listener is stopping"
        if not self._thread.is_alive():
            return False, "the accept thread has ended"
        since_failure = time.monotonic() - self._last_failure
        if self._last_failure > self._last_accept or since_failure < _UNREADY_AFTER_FAILURE_S:
            return False, f"accept() failed {since_failure:.1f} s ago: {self._failure}"
        with self._lock:
            pending, established = len(self._pending), self._established
        return True, f"accepting ({established} associations, {pending} connections negotiating)"

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self._closing:
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:
                if self._closing or self._sock.fileno() < 0:
                    return  # closed by shutdown()
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                backoff = min(max(backoff * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
                self._accept_failed(exc, backoff)
                self._stopped.wait(backoff)
                continue
            except Exception as exc:  # never let the accept thread die silently
                backoff = min(max(backoff * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
                self._accept_failed(exc, backoff)
                self._stopped.wait(backoff)
                continue
            if self._last_failure > self._last_accept:
                _log.warning("listener_accepting_again", after_s=round(time.monotonic() - self._last_failure, 2))
            self._last_accept = time.monotonic()
            backoff = 0.0
            try:
                self._start_connection(conn, addr)
            except Exception as exc:  # a thread that cannot start: drop this connection only
                with contextlib.suppress(OSError):
                    conn.close()
                backoff = _ACCEPT_BACKOFF[0]
                self._accept_failed(exc, backoff)
                self._stopped.wait(backoff)

    def _accept_failed(self, exc: BaseException, backoff: float) -> None:
        """Log, shed half of the connections not associated yet (they hold the descriptors a
        sender needs), and remember the failure for :meth:`accepting`."""
        name = errno.errorcode.get(exc.errno, "") if isinstance(exc, OSError) and exc.errno else ""
        self._failure = f"{name or type(exc).__name__}: {exc}"[:200]
        first = self._last_failure <= self._last_accept
        self._last_failure = time.monotonic()
        with self._lock:
            shed = self._shed(max(1, len(self._pending) // 2))
        (_log.error if first else _log.warning)(
            "listener_accept_failed", error=self._failure, errno=name or None,
            shed_connections=shed, retry_in_s=backoff,
        )

    def _shed(self, n: int) -> int:
        """Close the ``n`` oldest connections not associated yet (hold ``self._lock``)."""
        shed = 0
        for key in list(self._pending)[:n]:
            sock = self._pending.pop(key)
            self._shed_ids.add(key)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            shed += 1
        return shed

    def _start_connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        with self._lock:
            if self._closing:
                conn.close()
                return
            key = self._next_id
            self._next_id += 1
            self._pending[key] = conn
            shed = self._shed(len(self._pending) - self.config.max_pending) if (
                len(self._pending) > self.config.max_pending
            ) else 0
        if shed:
            self._shed_unlogged += shed
            now = time.monotonic()
            if now - self._shed_logged_at >= 1.0:  # one line a second under a flood
                _log.warning("connection_shed", reason="max_pending_connections reached",
                             max_pending_connections=self.config.max_pending,
                             shed_connections=self._shed_unlogged)
                self._shed_logged_at, self._shed_unlogged = now, 0
        tune_socket(conn)
        thread = threading.Thread(
            target=self._serve, args=(conn, addr, key), name=f"dicom-assoc-{addr[1]}", daemon=True
        )
        thread.acceptor = self  # type: ignore[attr-defined]
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._pending.pop(key, None)
            raise

    def _associated(self, key: int) -> bool:
        """The connection ``key`` became an association: no longer pending, counted."""
        with self._lock:
            if key in self._shed_ids:
                return False
            self._pending.pop(key, None)
            self._established += 1
            return True

    def _serve(self, conn: socket.socket, addr: tuple[str, int], key: int) -> None:
        address = f"{addr[0]}:{addr[1]}"
        ident = threading.get_ident()
        with self._lock:
            self._active[ident] = conn
        accepted_at = time.monotonic()
        try:
            sock = conn
            if self.ssl_context is not None:
                # CPython's TLS handshake takes the socket timeout as a deadline for the whole
                # handshake (not per receive); the A-ASSOCIATE-RQ gets what is left of it.
                conn.settimeout(self.config.acse_timeout)
                try:
                    sock = self.ssl_context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    if key not in self._shed_ids:
                        self.handler.tls_failed(address, str(exc))
                    return
                with self._lock:
                    self._active[ident] = sock
            _AssociationRun(self, sock, addr, key, accepted_at).run()
        except Exception as exc:  # never let a thread die silently
            self.handler.connection_failed(address, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._active.pop(ident, None)
                self._pending.pop(key, None)
                self._shed_ids.discard(key)
            with contextlib.suppress(OSError):
                conn.close()

    @property
    def established(self) -> int:
        """Associations established and not ended yet."""
        return self._established

    def _count(self, delta: int) -> int:
        with self._lock:
            self._established += delta
            return self._established


class _AssociationRun:
    """One association from A-ASSOCIATE-RQ to release or abort."""

    def __init__(
        self, acceptor: Acceptor, sock: socket.socket, addr: tuple[str, int], key: int,
        accepted_at: float,
    ) -> None:
        self.acceptor = acceptor
        self.key = key
        self.config = acceptor.config
        self.handler = acceptor.handler
        self.sock = sock
        self.addr = addr
        self.conn = Connection(sock)
        self.limit = (
            self.config.maximum_pdu_size + 6 if self.config.maximum_pdu_size else _MAX_DATA_PDU
        )
        #: When the connection was accepted (``time.monotonic()``).
        self.started = accepted_at

    def run(self) -> None:
        address = f"{self.addr[0]}:{self.addr[1]}"
        config = self.config
        self.conn.set_timeout(config.acse_timeout)
        self.conn.set_deadline(
            self.started + config.acse_timeout, "A-ASSOCIATE-RQ not complete within acse_timeout"
        )
        try:
            pdu_type, body = self.conn.read_pdu(config.max_request_pdu)
        except (Closed, ConnectionError):
            return  # a port probe or a health check: nothing to say
        except TimeoutError:
            self.handler.connection_failed(
                address,
                f"A-ASSOCIATE-RQ not complete within acse_timeout ({config.acse_timeout:g} s)"
                if self.conn.anything else "no A-ASSOCIATE-RQ within acse_timeout",
            )
            self._send_quietly(abort_pdu(ABORT_NOT_SPECIFIED))
            return
        except Abort as exc:
            self.handler.connection_failed(address, str(exc))
            self._send_quietly(abort_pdu(exc.reason))
            return
        except OSError as exc:
            if not self.acceptor.closing and self.key not in self.acceptor._shed_ids:
                self.handler.connection_failed(address, f"connection failed: {exc}")
            return
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            known = A_ASSOCIATE_RQ_PDU <= pdu_type <= A_ABORT_PDU
            self.handler.connection_failed(address, f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
            if pdu_type != A_ABORT_PDU:
                self._send_quietly(abort_pdu(ABORT_UNEXPECTED_PDU if known else ABORT_UNRECOGNIZED_PDU))
            return
        assoc = self._negotiate(address, body)
        if assoc is None:
            return
        del body
        if not self.acceptor._associated(self.key):
            return  # shed while negotiating: its socket is shut down
        self.conn.associated()
        released, reason = False, "aborted"
        try:
            self.handler.accepted(assoc)
            released, reason = self._serve(assoc)
        finally:
            self.acceptor._count(-1)
            self.handler.ended(assoc, released, reason)

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(data)

    # -- negotiation -----------------------------------------------------------------------------
    def _negotiate(self, address: str, body: bytes | bytearray) -> Association | None:
        key = bytes(body[_FIXED_PART:])
        try:
            called, calling = decode_ae_title(body[4:20], "Called"), decode_ae_title(body[20:36], "Calling")
            negotiated = self.acceptor._remembered(key) if len(body) > _FIXED_PART else None
            if negotiated is None:
                negotiated = self._decode_request(body)
                self.acceptor._remember(key, negotiated)
        except Exception as exc:  # untrusted bytes: pynetdicom raises several types here
            self.handler.connection_failed(address, f"undecodable A-ASSOCIATE-RQ: {exc}"[:200])
            self._send_quietly(abort_pdu(ABORT_INVALID_PDU_PARAMETER))
            return None
        request = AssociationRequest(
            calling_ae_title=calling,
            called_ae_title=called,
            address=self.addr[0],
            port=self.addr[1],
            implementation_class_uid=negotiated.implementation_class_uid,
            implementation_version_name=negotiated.implementation_version_name,
        )
        try:
            if not body[1] & 0x01:  # protocol version, a bit field: bit 0 is version 1
                raise AssociationRejected(1, 2, 2, "protocol version not supported")
            if negotiated.application_context != APPLICATION_CONTEXT_NAME:
                raise AssociationRejected(1, 1, 2, "application context name not supported")
            self.handler.check(request, self.acceptor._count(0))
        except AssociationRejected as rejection:
            self.handler.rejected(request, rejection)  # logged before the peer can react
            self._send_quietly(reject_pdu(rejection.result, rejection.source, rejection.reason))
            return None
        ac = b"".join((
            PDU_HEADER.pack(A_ASSOCIATE_AC_PDU, _FIXED_PART + len(negotiated.ac_items)),
            b"\x00\x01\x00\x00",
            called.encode("ascii").ljust(16, b" "),
            calling.encode("ascii").ljust(16, b" "),
            bytes(32),
            negotiated.ac_items,
        ))
        try:
            self.conn.send(ac)
        except OSError as exc:
            self.handler.connection_failed(address, f"could not send A-ASSOCIATE-AC: {exc}")
            return None
        return Association(request, dict(negotiated.contexts), negotiated.peer_max_pdu)

    def _decode_request(self, body: bytes | bytearray) -> _Negotiated:
        """Decode an A-ASSOCIATE-RQ's items with pynetdicom and negotiate its contexts.

        Raises
        ------
        Exception
            Whatever pynetdicom raises on bytes that are not a valid request.
        """
        rq_pdu = A_ASSOCIATE_RQ()
        rq_pdu.decode(PDU_HEADER.pack(A_ASSOCIATE_RQ_PDU, len(body)) + bytes(body))
        primitive = rq_pdu.to_primitive()
        items = primitive.user_information
        max_length = next((i for i in items if isinstance(i, MaximumLengthNotification)), None)
        impl_uid = next((i for i in items if isinstance(i, ImplementationClassUIDNotification)), None)
        impl_name = next(
            (i for i in items if isinstance(i, ImplementationVersionNameNotification)), None
        )
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in items
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        results, role_items = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, self.acceptor._supported, roles or None
        )
        reply = A_ASSOCIATE()
        reply.application_context_name = APPLICATION_CONTEXT_NAME
        reply.calling_ae_title = primitive.calling_ae_title
        reply.called_ae_title = primitive.called_ae_title
        reply.result = 0x00
        reply.result_source = 0x01
        reply.presentation_context_definition_results_list = results
        ours_max = MaximumLengthNotification()
        ours_max.maximum_length_received = self.config.maximum_pdu_size
        ours_uid = ImplementationClassUIDNotification()
        ours_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ours_name = ImplementationVersionNameNotification()
        ours_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        user_info: list[object] = [ours_max, ours_uid, ours_name, *role_items]
        if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in items):
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            user_info.append(window)
        reply.user_information = user_info  # type: ignore[assignment]
        ac_pdu = A_ASSOCIATE_AC()
        ac_pdu.from_primitive(reply)
        return _Negotiated(
            application_context=str(primitive.application_context_name),
            peer_max_pdu=int(max_length.maximum_length_received or 0) if max_length else 0,
            implementation_class_uid=str(impl_uid.implementation_class_uid or "") if impl_uid else "",
            implementation_version_name=str(impl_name.implementation_version_name or "")
            if impl_name else "",
            contexts={
                int(cx.context_id): Context(int(cx.context_id), str(cx.abstract_syntax),
                                            str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00 and cx.context_id is not None
            },
            ac_items=ac_pdu.encode()[6 + _FIXED_PART:],
        )

    # -- data transfer ---------------------------------------------------------------------------
    def _serve(self, assoc: Association) -> tuple[bool, str]:
        """Serve messages until release or abort; return (released, why it ended)."""
        config = self.config
        self.conn.set_timeout(config.network_timeout)
        message: _Message | None = None
        try:
            while True:
                if message is None:
                    # Idle: the next PDU's first byte within network_timeout; from it, the
                    # whole DIMSE message it begins within dimse_timeout.
                    self.conn.set_deadline(
                        None if config.network_timeout is None
                        else time.monotonic() + config.network_timeout,
                        "no data for network_timeout",
                    )
                    pdu_type, body = self.conn.read_pdu(self.limit, config.dimse_timeout)
                else:
                    pdu_type, body = self.conn.read_pdu(self.limit)
                if pdu_type == P_DATA_TF_PDU:
                    message = self._p_data(assoc, message, body)
                elif pdu_type == A_RELEASE_RQ_PDU:
                    if message is not None:
                        raise Abort(ABORT_UNEXPECTED_PDU, "A-RELEASE-RQ inside a DIMSE message")
                    self._send_quietly(RELEASE_RP)
                    return True, "released"
                elif pdu_type == A_ABORT_PDU:
                    return False, "aborted by the peer"
                elif A_ASSOCIATE_RQ_PDU <= pdu_type <= A_RELEASE_RP_PDU:
                    raise Abort(ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")
                else:
                    raise Abort(ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}")
        except Abort as exc:
            self._send_quietly(abort_pdu(exc.reason))
            return False, f"aborted: {exc}"
        except DeadlineExceeded as exc:
            self._send_quietly(abort_pdu(ABORT_NOT_SPECIFIED))
            limit = config.network_timeout if str(exc).startswith("no data") else config.dimse_timeout
            return False, f"aborted: {exc} ({limit or 0:g} s)"
        except TimeoutError:
            self._send_quietly(abort_pdu(ABORT_NOT_SPECIFIED))
            return False, f"aborted: a send timed out ({config.network_timeout or 0:g} s)"
        except (Closed, ConnectionError):
            if self.acceptor.closing:
                return False, "aborted: the listener is stopping"
            return False, "connection closed by the peer without release"
        except OSError as exc:
            return False, f"connection failed: {exc}"

    def _p_data(
        self, assoc: Association, message: _Message | None, body: bytes | bytearray
    ) -> _Message | None:
        view = memoryview(body)
        offset, end = 0, len(body)
        if end < 6:
            raise Abort(ABORT_INVALID_PDU_PARAMETER, "P-DATA-TF without a PDV")
        while offset < end:
            if offset + 6 > end:
                raise Abort(ABORT_INVALID_PDU_PARAMETER, "PDV header truncated")
            item_length, context_id, control = PDV_HEADER.unpack_from(body, offset)
            stop = offset + 4 + item_length
            if item_length < 2 or stop > end:
                raise Abort(ABORT_INVALID_PDU_PARAMETER, f"PDV length {item_length} out of range")
            if context_id not in assoc.contexts:
                raise Abort(
                    ABORT_INVALID_PDU_PARAMETER, f"PDV on presentation context {context_id}, not accepted"
                )
            fragment = view[offset + 6:stop]
            offset = stop
            if message is None:
                message = _Message(context_id)
            elif context_id != message.context_id:
                raise Abort(ABORT_UNEXPECTED_PDU, "PDV on another presentation context mid-message")
            if control & 0x01:  # command fragment
                if message.dataset is not None:
                    raise Abort(ABORT_UNEXPECTED_PDU, "command fragment inside a data set")
                message.command.append(fragment)
                message.size += len(fragment)
                if message.size > _MAX_COMMAND:
                    raise Abort(ABORT_INVALID_PDU_PARAMETER, f"command set over {_MAX_COMMAND} bytes")
                if control & 0x02:
                    try:
                        message.fields = decode_command(b"".join(message.command))
                    except ValueError as exc:
                        raise Abort(ABORT_INVALID_PDU_PARAMETER, f"command set: {exc}") from None
                    if decode_us(message.fields.get(0x0800)) == NO_DATA_SET:
                        self._dispatch(assoc, message, None)
                        message = None
                    else:
                        message.dataset = []
                        message.size = 0
            else:
                if message.dataset is None:
                    raise Abort(ABORT_UNEXPECTED_PDU, "data set fragment before its command")
                message.dataset.append(fragment)
                message.size += len(fragment)
                if self.config.max_message_bytes and message.size > self.config.max_message_bytes:
                    raise Abort(
                        ABORT_NOT_SPECIFIED,
                        f"data set over max_instance_mb ({self.config.max_message_bytes >> 20} MiB)",
                    )
                if control & 0x02:
                    dataset = b"".join(message.dataset)
                    message.dataset = None  # the PDU bodies go: one copy while it is stored
                    self._dispatch(assoc, message, dataset)
                    message = None
        return message

    def _dispatch(self, assoc: Association, message: _Message, dataset: bytes | None) -> None:
        fields = message.fields
        command = decode_us(fields.get(0x0100))
        message_id = decode_us(fields.get(0x0110)) or 0
        context = assoc.contexts[message.context_id]
        comment: str | None = None
        sop_class = decode_text(fields.get(0x0002))
        sop_instance = decode_text(fields.get(0x1000))
        if command == C_STORE_RQ and dataset is not None:
            request = StoreRequest(
                message_id=message_id,
                affected_sop_class_uid=sop_class,
                affected_sop_instance_uid=sop_instance,
                priority=decode_us(fields.get(0x0700)) or 0,
                move_originator_ae_title=decode_text(fields.get(0x1030)) or None,
                context=context,
                dataset=dataset,
            )
            status, comment = self.handler.store(assoc, request)
        elif command == C_ECHO_RQ:
            status = self.handler.echo(assoc)
            sop_class = sop_class or context.abstract_syntax
        elif command == N_EVENT_REPORT_RQ:
            status = self.handler.event_report(assoc, EventReportRequest(
                message_id=message_id, affected_sop_class_uid=sop_class, affected_sop_instance_uid=sop_instance,
                event_type_id=decode_us(fields.get(0x1002)), context=context, dataset=dataset,
            ))
            response = encode_response(command, message_id, status, sop_class_uid=sop_class or None,
                                       sop_instance_uid=sop_instance or None,
                                       event_type_id=decode_us(fields.get(0x1002)))
            self.conn.send(p_data_pdus(message.context_id, response, assoc.peer_max_pdu))
            return
        elif command == C_CANCEL_RQ:
            return
        elif command is None or command & 0x8000:
            raise Abort(ABORT_UNEXPECTED_PDU, f"not a DIMSE request (command field {command})")
        else:
            status = UNRECOGNIZED_OPERATION
            comment = "only C-STORE, C-ECHO and N-EVENT-REPORT are provided"
        response = encode_response(
            command, message_id, status, sop_class_uid=sop_class or None,
            sop_instance_uid=sop_instance or None, error_comment=comment,
        )
        self.conn.send(p_data_pdus(message.context_id, response, assoc.peer_max_pdu))

