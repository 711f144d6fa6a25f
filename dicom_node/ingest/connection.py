"""One association's socket: whole PDUs read with few system calls, each phase of the
association (negotiation, a DIMSE message, idle) within its deadline, memory that follows what
has arrived.  Used by :mod:`dicom_node.ingest.acceptor`."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Final

from dicom_node.dimse import arm_quickack
from dicom_node.ingest.pdu import (
    ABORT_INVALID_PDU_PARAMETER,
    PDU_HEADER,
)

#: Size of the read-ahead buffer once associated; larger PDU bodies are read into their own
#: buffer, which grows with what has arrived (a declared length commits no memory).
_BUFFER: Final = 256 << 10
#: The read-ahead buffer of a connection not associated yet (it holds an A-ASSOCIATE-RQ).
_SMALL_BUFFER: Final = 16 << 10
#: A PDU body read into its own buffer starts at this size and doubles as bytes arrive.
_BODY_STEP: Final = 1 << 20
#: A deadline is met within this much: the kernel's receive timeout is set again only when
#: it would run this much past the deadline (not before every receive).
_DEADLINE_SLACK: Final = 0.05
_DIMSE_PHASE: Final = "DIMSE message not complete within dimse_timeout"


class Abort(Exception):
    """Abort the association with ``reason`` (source: service provider)."""

    def __init__(self, reason: int, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class Closed(Exception):
    """The peer closed the connection."""


class DeadlineExceeded(TimeoutError):
    """A phase of the association (negotiation, a DIMSE message, idle) ran past its deadline."""


class Connection:
    """Reads whole PDUs from a socket with few system calls, each phase within its deadline.

    Memory follows what has arrived: the read-ahead buffer is small until the association is
    accepted (:meth:`associated`), and a PDU body larger than it is read into a buffer that
    grows (doubling) with the bytes received, never to the length the header declares.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(_SMALL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._deadline = float("inf")
        self._phase = ""
        #: The receive timeout set in the kernel (seconds; inf: none).
        self._rcv = float("inf")
        #: Whether any byte has arrived yet.
        self.anything = False
        #: Seconds: when the next byte arrives, the deadline becomes then + this (a DIMSE
        #: message's deadline starts with its first byte).
        self._arm: float | None = None

    def associated(self) -> None:
        """Use the full read-ahead buffer from now on."""
        if len(self._buf) < _BUFFER:
            buf = bytearray(_BUFFER)
            size = self._end - self._start
            buf[:size] = self._view[self._start:self._end]
            self._view.release()
            self._buf, self._view, self._start, self._end = buf, memoryview(buf), 0, size

    def set_timeout(self, seconds: float | None) -> None:
        """Make each blocking send give up after ``seconds`` (``TimeoutError``), and receives
        too until a deadline is set (:meth:`set_deadline`).

        A plain TCP socket stays in blocking mode and gets the timeout from the kernel
        (``SO_RCVTIMEO``/``SO_SNDTIMEO``): with Python's own timeout every ``recv`` and ``send``
        is preceded by a ``poll``, two system calls - and two hand-overs of the GIL among the
        association threads - instead of one.  TLS sockets keep Python's timeout.
        """
        if seconds is not None and seconds <= 0:
            seconds = None  # no timeout
        self._rcv = float("inf") if seconds is None else seconds
        if seconds is None or isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)
            return
        self.sock.settimeout(None)
        timeval = self._timeval(seconds)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    @staticmethod
    def _timeval(seconds: float) -> bytes:
        seconds = max(seconds, 0.001)
        whole = int(seconds)
        return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))

    def _set_receive_timeout(self, seconds: float) -> None:
        self._rcv = seconds
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(None if seconds == float("inf") else seconds)
        elif seconds == float("inf"):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 0))
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval(seconds))

    def set_deadline(self, deadline: float | None, phase: str) -> None:
        """Every receive from now on must end by ``deadline`` (``time.monotonic()``; None:
        none), else :class:`DeadlineExceeded` naming ``phase``: a peer trickling one byte at a
        time no longer restarts a timeout with each byte."""
        self._deadline = float("inf") if deadline is None else deadline
        self._phase = phase

    def _recv_into(self, view: memoryview) -> int:
        arm_quickack(self.sock)
        expired = False
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(self._phase)
            if expired or self._rcv > remaining + _DEADLINE_SLACK:
                self._set_receive_timeout(remaining)
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, TimeoutError):  # the receive timeout ran out
                expired = True
                continue
            if not n:
                raise Closed
            self.anything = True
            if self._arm is not None:
                self.set_deadline(time.monotonic() + self._arm, _DIMSE_PHASE)
                self._arm = None
            return n

    def _fill(self, need: int) -> None:
        while self._end - self._start < need:
            if self._start == self._end:
                self._start = self._end = 0
            elif len(self._buf) - self._start < need:
                size = self._end - self._start
                self._buf[:size] = self._buf[self._start:self._end]
                self._start, self._end = 0, size
            self._end += self._recv_into(self._view[self._end:])

    def read_pdu(self, limit: int, within: float | None = None) -> tuple[int, bytes | bytearray]:
        """The next PDU's type and body; PDUs longer than ``limit`` abort the association.

        ``within``: from its first byte, this PDU - and the DIMSE message it may begin - must
        arrive within this many seconds (until then the deadline set before applies).
        """
        if within is not None:
            if self._end > self._start:  # its first byte is here already
                self.set_deadline(time.monotonic() + within, _DIMSE_PHASE)
            else:
                self._arm = within
        try:
            self._fill(6)
        finally:
            self._arm = None
        pdu_type, length = PDU_HEADER.unpack_from(self._buf, self._start)
        self._start += 6
        if length > limit:
            raise Abort(ABORT_INVALID_PDU_PARAMETER, f"PDU of {length} bytes (limit {limit})")
        buffered = self._end - self._start
        if buffered >= length:
            body = bytes(self._view[self._start:self._start + length])
            self._start += length
            return pdu_type, body
        # Larger than what is buffered: read the rest into the body's own buffer, which grows
        # with what arrives (a header declaring 64 MiB commits nothing before the bytes come).
        big = bytearray(max(buffered, min(length, _BODY_STEP)))
        big[:buffered] = self._view[self._start:self._end]
        self._start = self._end = 0
        got = buffered
        while got < length:
            if got == len(big):
                big.extend(bytes(min(len(big), length - got)))
            with memoryview(big) as view:
                got += self._recv_into(view[got:])
        return pdu_type, big

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO ran out
            raise TimeoutError("send timed out") from None
