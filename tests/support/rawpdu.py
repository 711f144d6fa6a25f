"""A small raw DICOM upper-layer client for attacking a listener over a real socket.

It builds the PDUs byte by byte (A-ASSOCIATE-RQ through pynetdicom's PDU classes, P-DATA-TF
and DIMSE command sets with ``struct``), so a test can send what no well-behaved SCU sends:
a header declaring more than follows, a data set that never ends, one byte every second.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

_ELEMENT = struct.Struct("<HHI")


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big endian length, body."""
    return struct.pack(">BxI", pdu_type, len(body)) + body


def pdu_header(pdu_type: int, declared_length: int) -> bytes:
    """Only a PDU's 6-byte header, declaring ``declared_length`` bytes of body."""
    return struct.pack(">BxI", pdu_type, declared_length)


def associate_rq(
    contexts: Sequence[tuple[str, Sequence[str]]], *, called: str = "DICOM_NODE", calling: str = "ATTACKER",
    max_pdu: int = 0,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (abstract syntax, transfer syntaxes) with
    context IDs 1, 3, 5..."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = 2 * i + 1
        items.append(cx)
    primitive.presentation_context_definition_list = items
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    primitive.user_information = [max_length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def pdv(context_id: int, fragment: bytes, *, command: bool, last: bool) -> bytes:
    """One presentation data value item."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def p_data(context_id: int, fragment: bytes, *, command: bool, last: bool) -> bytes:
    """A P-DATA-TF PDU holding one PDV."""
    return pdu(0x04, pdv(context_id, fragment, command=command, last=last))


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (implicit VR little endian, group length first)."""
    body = b"".join(_element(e, v) for e, v in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set([
        (0x0002, sop_class.encode()), (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)), (0x1000, sop_instance.encode()),
    ])


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set([
        (0x0002, VERIFICATION.encode()), (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101)),
    ])


def decode_command(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        _, element, length = _ELEMENT.unpack_from(data, offset)
        out[element] = data[offset + 8:offset + 8 + length]
        offset += 8 + length
    return out


class RawAssociation:
    """A TCP connection to a listener, spoken to PDU by PDU."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: IDs of the presentation contexts accepted (1, 3, 5... in the order proposed).
        self.accepted: list[int] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, interval: float, until: float | None = None) -> bool:
        """Send ``data`` one byte every ``interval`` s; False once the peer is gone (or when
        ``until``, a ``time.monotonic()`` value, has passed)."""
        for i in range(len(data)):
            if until is not None and time.monotonic() > until:
                return True
            try:
                self.sock.sendall(data[i:i + 1])
            except OSError:
                return False
            time.sleep(interval)
        return True

    def _recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the listener")
            out += chunk
        return bytes(out)

    def read_pdu(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next PDU from the listener (``ConnectionError`` when it closed the connection)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        pdu_type, length = struct.unpack(">BxI", self._recv_exactly(6))
        return pdu_type, self._recv_exactly(length)

    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]], **kwargs: object) -> int:
        """Send an A-ASSOCIATE-RQ; return the PDU type answered (2: accepted)."""
        self.send(associate_rq(contexts, **kwargs))  # type: ignore[arg-type]
        pdu_type, body = self.read_pdu()
        if pdu_type == 0x02:
            offset = 68
            while offset + 4 <= len(body):
                item_type, length = struct.unpack_from(">BxH", body, offset)
                if item_type == 0x21 and body[offset + 6] == 0:  # presentation context: accepted
                    self.accepted.append(body[offset + 4])
                offset += 4 + length
        return pdu_type

    def response_status(self, timeout: float | None = None) -> tuple[int, str]:
        """The status and Error Comment of the next DIMSE response."""
        command = b""
        while True:
            pdu_type, body = self.read_pdu(timeout)
            if pdu_type != 0x04:
                raise ConnectionError(f"PDU type 0x{pdu_type:02X} instead of a response")
            offset = 0
            while offset < len(body):
                length, _, control = struct.unpack_from(">IBB", body, offset)
                command += body[offset + 6:offset + 4 + length]
                offset += 4 + length
                if control & 0x02:
                    fields = decode_command(command)
                    comment = fields.get(0x0902, b"").rstrip(b" \x00").decode("ascii", "replace")
                    return struct.unpack("<H", fields[0x0900])[0], comment

    def store(self, context_id: int, sop_class: str, sop_instance: str, dataset: bytes,
              fragment: int = 16 << 10) -> tuple[int, str]:
        """Send a C-STORE-RQ and its data set in PDUs of ``fragment`` bytes; return the status."""
        self.send(p_data(context_id, c_store_rq(sop_class, sop_instance), command=True, last=True))
        for start in range(0, max(len(dataset), 1), fragment):
            chunk = dataset[start:start + fragment]
            self.send(p_data(context_id, chunk, command=False, last=start + fragment >= len(dataset)))
        return self.response_status()

    def release(self) -> None:
        self.send(pdu(0x05, b"\x00" * 4))
        with contextlib.suppress(OSError):
            self.read_pdu(5)

    def ended_by_listener(self, timeout: float) -> str:
        """Wait up to ``timeout`` s for the listener to end the connection: "abort" (A-ABORT
        then close), "closed", or "open" when it is still open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pdu_type, _ = self.read_pdu(max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                return "open"
            except OSError:
                return "closed"
            if pdu_type == 0x07:
                return "abort"
        return "open"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """Number of file descriptors process ``pid`` holds."""
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))
