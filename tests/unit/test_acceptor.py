"""The acceptor's hand-made encoders against pynetdicom's, and its protocol behaviour on raw sockets."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from dicom_node.ingest.acceptor import (
    Acceptor,
    AcceptorConfig,
    Association,
    AssociationRejected,
    AssociationRequest,
    EventReportRequest,
    StoreRequest,
)
from dicom_node.ingest.pdu import decode_command, encode_response, p_data_pdus
from tests.conftest import require_tool
from tests.support import procs

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
COMMITMENT = "1.2.840.10008.1.20.1"


def _pynetdicom_store_rsp(status: int, message_id: int, sop_class: str | None, sop_instance: str | None,
                          comment: str | None = None) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    out = encode(msg.command_set, True, True)
    assert out is not None
    return out


@pytest.mark.parametrize(
    ("status", "message_id", "sop_class", "sop_instance", "comment"),
    [
        (0x0000, 1, CT, "1.2.3.4.5", None),  # odd-length instance UID
        (0xA700, 65535, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.56", "refused: low disk"),
        (0xC211, 7, CT, "2.25." + "9" * 59, "internal error, see the node's log"),  # 64 characters
        (0xB000, 2, None, None, None),  # no UIDs at all
        (0xA900, 3, CT, "1.2.3", "refused: sop class mismatch"),  # odd comment: padded with a space
    ],
)
def test_store_response_matches_pynetdicom(
    status: int, message_id: int, sop_class: str | None, sop_instance: str | None, comment: str | None
) -> None:
    """The hand encoder yields exactly pynetdicom's command set, Error Comment included."""
    ours = encode_response(C_STORE_RQ_FIELD, message_id, status, sop_class_uid=sop_class,
                           sop_instance_uid=sop_instance, error_comment=comment)
    assert ours == _pynetdicom_store_rsp(status, message_id, sop_class, sop_instance, comment)


C_STORE_RQ_FIELD = 0x0001


def test_echo_response_matches_pynetdicom() -> None:
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = VERIFICATION
    rsp.Status = 0
    msg = C_ECHO_RSP()
    msg.primitive_to_message(rsp)
    assert encode_response(0x0030, 9, 0, sop_class_uid=VERIFICATION) == encode(msg.command_set, True, True)


def test_decode_command_reads_a_pynetdicom_store_request() -> None:
    rq = C_STORE()
    rq.MessageID = 513
    rq.AffectedSOPClassUID = CT
    rq.AffectedSOPInstanceUID = "1.2.3.4.5"
    rq.Priority = 2
    rq.MoveOriginatorApplicationEntityTitle = "MOVER"
    rq.MoveOriginatorMessageID = 4
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    raw = encode(msg.command_set, True, True)
    assert raw is not None
    fields = decode_command(raw)
    assert struct.unpack("<H", fields[0x0100])[0] == 0x0001
    assert struct.unpack("<H", fields[0x0110])[0] == 513
    assert fields[0x0002].rstrip(b"\x00") == CT.encode()
    assert fields[0x1000].rstrip(b"\x00") == b"1.2.3.4.5"
    assert fields[0x1030].strip() == b"MOVER"
    with pytest.raises(ValueError, match=r"command|truncated"):
        decode_command(raw[:-3])


def test_p_data_fragments_respect_the_peer_maximum() -> None:
    command = bytes(range(256)) * 3
    data = p_data_pdus(5, command, 100)
    offset, rebuilt, controls = 0, b"", []
    while offset < len(data):
        pdu_type, length = struct.unpack_from(">BxI", data, offset)
        assert pdu_type == 0x04 and length <= 100
        item_length, context_id, control = struct.unpack_from(">IBB", data, offset + 6)
        assert context_id == 5 and item_length == length - 4
        rebuilt += data[offset + 12:offset + 6 + length]
        controls.append(control)
        offset += 6 + length
    assert rebuilt == command
    assert controls[-1] == 0x03 and set(controls[:-1]) == {0x01}
    assert p_data_pdus(1, command, 0).count(b"\x04\x00") >= 1 and len(p_data_pdus(1, command, 0)) == 12 + len(command)


# -- protocol behaviour ------------------------------------------------------------------------
class _Recorder:
    """An ScpHandler that stores nothing and remembers what happened."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.stored: list[StoreRequest] = []
        self.reports: list[EventReportRequest] = []
        self.done = threading.Event()

    def check(self, request: AssociationRequest, active: int) -> None:
        if request.calling_ae_title == "INTRUDER":
            raise AssociationRejected(1, 1, 3, "calling AE title not recognized")

    def accepted(self, assoc: Association) -> None:
        self.events.append(("accepted", assoc.calling_ae_title))

    def rejected(self, request: AssociationRequest, rejection: AssociationRejected) -> None:
        self.events.append(("rejected", rejection.text))

    def echo(self, assoc: Association) -> int:
        return 0

    def store(self, assoc: Association, request: StoreRequest) -> tuple[int, str | None]:
        self.stored.append(request)
        return 0, None

    def event_report(self, assoc: Association, request: EventReportRequest) -> int:
        self.reports.append(request)
        return 0

    def ended(self, assoc: Association, released: bool, reason: str) -> None:
        self.events.append(("ended", reason))
        self.done.set()

    def connection_failed(self, address: str, error: str) -> None:
        self.events.append(("failed", error))

    def tls_failed(self, address: str, error: str) -> None:
        self.events.append(("tls", error))


@pytest.fixture
def served() -> Iterator[tuple[Acceptor, _Recorder]]:
    handler = _Recorder()
    acceptor = Acceptor(
        ("127.0.0.1", 0),
        AcceptorConfig(contexts={CT: (ExplicitVRLittleEndian,), VERIFICATION: (ExplicitVRLittleEndian,),
                                 COMMITMENT: (ExplicitVRLittleEndian,)},
                       role_classes=frozenset({COMMITMENT}), acse_timeout=5, network_timeout=5),
        handler,
    )
    yield acceptor, handler
    acceptor.shutdown()


def _request_pdu(calling: str = "SCU", app_context: str = "1.2.840.10008.3.1.1.1") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = app_context
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "ANY"
    cx = build_context(CT, [ExplicitVRLittleEndian])
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    primitive.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "connection closed before a PDU"
        header += chunk
    pdu_type, length = struct.unpack(">BxI", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return pdu_type, body


def _associate(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(_request_pdu())
    assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
    return sock


def test_storage_commitment_report_with_role_selection_is_answered(served: tuple[Acceptor, _Recorder]) -> None:
    """An archive opening an association as the SCP of Storage Commitment (Role Selection:
    SCP only) gets that role, and its N-EVENT-REPORT reaches the handler and is answered."""
    from pynetdicom.presentation import build_role

    acceptor, handler = served
    ae = AE("ARCHIVE")
    ae.add_requested_context(COMMITMENT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", acceptor.port, ext_neg=[build_role(COMMITMENT, scu_role=False, scp_role=True)])
    assert assoc.is_established
    [cx] = assoc.accepted_contexts
    assert cx.as_scp and not cx.as_scu  # the role the archive asked for
    info = Dataset()
    info.TransactionUID = "1.2.3.4"
    status, _ = assoc.send_n_event_report(info, 1, COMMITMENT, "1.2.840.10008.1.20.1.1")
    assoc.release()
    assert status is not None and status.Status == 0 and status.EventTypeID == 1
    [report] = handler.reports
    assert (report.affected_sop_class_uid, report.event_type_id) == (COMMITMENT, 1)
    assert report.dataset is not None and b"1.2.3.4" in report.dataset


def test_wrong_application_context_and_unknown_caller_are_rejected(served: tuple[Acceptor, _Recorder]) -> None:
    acceptor, handler = served
    for calling, app, reason in (("SCU", "1.2.3", 2), ("INTRUDER", "1.2.840.10008.3.1.1.1", 3)):
        with socket.create_connection(("127.0.0.1", acceptor.port), timeout=5) as sock:
            sock.sendall(_request_pdu(calling, app))
            pdu_type, body = _read_pdu(sock)
            assert (pdu_type, body[1], body[3]) == (0x03, 1, reason)  # A-ASSOCIATE-RJ, permanent
    assert [e for e in handler.events if e[0] == "rejected"] == [
        ("rejected", "application context name not supported"),
        ("rejected", "calling AE title not recognized"),
    ]


@pytest.mark.parametrize(
    ("payload", "reason", "why"),
    [
        (struct.pack(">BxI", 0x02, 4) + b"\0" * 4, 0x02, "unexpected PDU type 0x02"),
        (struct.pack(">BxI", 0x09, 4) + b"\0" * 4, 0x01, "unrecognized PDU type 0x09"),
        # A PDV on presentation context 3, which was never proposed.
        (struct.pack(">BxIIBB", 0x04, 8, 4, 3, 0x03) + b"\0\0", 0x06, "presentation context 3"),
        # A data set fragment without its command.
        (struct.pack(">BxIIBB", 0x04, 8, 4, 1, 0x02) + b"\0\0", 0x02, "before its command"),
    ],
)
def test_protocol_errors_are_answered_with_a_provider_abort(
    served: tuple[Acceptor, _Recorder], payload: bytes, reason: int, why: str
) -> None:
    acceptor, handler = served
    with _associate(acceptor.port) as sock:
        sock.sendall(payload)
        pdu_type, body = _read_pdu(sock)
    assert (pdu_type, body[2], body[3]) == (0x07, 2, reason)  # A-ABORT from the service provider
    assert handler.done.wait(5)
    assert any(kind == "ended" and why in text for kind, text in handler.events), handler.events


def test_port_probe_leaves_no_trace_and_other_commands_get_unrecognized_operation(
    served: tuple[Acceptor, _Recorder],
) -> None:
    acceptor, handler = served
    socket.create_connection(("127.0.0.1", acceptor.port), timeout=5).close()  # a health check
    with _associate(acceptor.port) as sock:
        # A C-FIND-RQ (0x0020) on the storage context: not provided here.
        command = b"".join((
            struct.pack("<HHIH", 0, 0x0100, 2, 0x0020),
            struct.pack("<HHIH", 0, 0x0110, 2, 77),
            struct.pack("<HHIH", 0, 0x0800, 2, 0x0101),
        ))
        sock.sendall(p_data_pdus(1, command, 0))
        _, body = _read_pdu(sock)
        fields = decode_command(body[6:])
        assert struct.unpack("<H", fields[0x0100])[0] == 0x8020
        assert struct.unpack("<H", fields[0x0120])[0] == 77
        assert struct.unpack("<H", fields[0x0900])[0] == 0x0211
        sock.sendall(struct.pack(">BxI", 0x05, 4) + b"\0" * 4)  # A-RELEASE-RQ
        assert _read_pdu(sock)[0] == 0x06
    assert handler.done.wait(5)
    assert [e[0] for e in handler.events] == ["accepted", "ended"]
    assert handler.events[-1] == ("ended", "released")


def test_pynetdicom_scu_stores_through_small_pdus() -> None:
    """With a 4 KiB maximum PDU the peer sends the data set in many PDVs; it arrives whole."""
    handler = _Recorder()
    acceptor = Acceptor(("127.0.0.1", 0), AcceptorConfig(contexts={CT: (ExplicitVRLittleEndian,)},
                                                         maximum_pdu_size=4096), handler)
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Test^Fragments"
    ds.ImageComments = "x" * 10000
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title="SMALLPDU")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 4096
    try:
        assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="ANY", max_pdu=4096)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 4096
        status = assoc.send_c_store(ds)
        assoc.release()
    finally:
        acceptor.shutdown()
    assert status.Status == 0
    assert len(handler.stored) == 1
    stored = handler.stored[0]
    assert stored.affected_sop_instance_uid == ds.SOPInstanceUID
    assert len(stored.dataset) > 10000 and b"Test^Fragments" in stored.dataset


def test_a_repeated_request_is_negotiated_from_the_cache_with_its_own_titles(
    served: tuple[Acceptor, _Recorder],
) -> None:
    """A sender proposing the same contexts again gets the same answer without pynetdicom
    decoding its request again; the titles, protocol version and checks are its own each time."""
    from pynetdicom.pdu import A_ASSOCIATE_AC

    acceptor, handler = served

    def associate(pdu: bytes) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", acceptor.port), timeout=5) as sock:
            sock.sendall(pdu)
            return _read_pdu(sock)

    def decoded(body: bytes) -> A_ASSOCIATE_AC:
        ac = A_ASSOCIATE_AC()
        ac.decode(struct.pack(">BxI", 0x02, len(body)) + body)
        return ac

    first_type, first = associate(_request_pdu("SCU_A"))
    second_type, second = associate(_request_pdu("  SCU_B"))  # leading spaces are not significant
    assert (first_type, second_type) == (0x02, 0x02)
    assert len(acceptor._negotiated) == 1
    a, b = decoded(first), decoded(second)
    assert (a.calling_ae_title, b.calling_ae_title, b.called_ae_title) == ("SCU_A", "SCU_B", "ANY")
    assert first[:20] == second[:20] and first[36:] == second[36:]  # only the calling title differs
    for body in (first, second):  # byte for byte what pynetdicom would encode
        assert decoded(body).encode() == struct.pack(">BxI", 0x02, len(body)) + body
    results = b.to_primitive().presentation_context_definition_results_list
    assert [(cx.context_id, cx.result, cx.transfer_syntax) for cx in results] == [
        (1, 0, [ExplicitVRLittleEndian])
    ]
    # Checks still run on the cached path: an unknown caller, a protocol version without bit 0.
    assert associate(_request_pdu("INTRUDER"))[0] == 0x03
    old_version = bytearray(_request_pdu("SCU_A"))
    old_version[6:8] = b"\x00\x02"
    pdu_type, body = associate(bytes(old_version))
    assert (pdu_type, body[3]) == (0x03, 2)  # A-ASSOCIATE-RJ: protocol version not supported
    blank = bytearray(_request_pdu("SCU_A"))
    blank[26:42] = b" " * 16  # calling AE title of spaces only
    pdu_type, body = associate(bytes(blank))
    assert (pdu_type, body[3]) == (0x07, 0x06)  # A-ABORT: invalid PDU parameter value
    assert len(acceptor._negotiated) == 1
    # Another set of contexts is negotiated (and remembered) on its own.
    assert associate(_request_pdu("SCU_A", app_context="1.2.3"))[0] == 0x03
    assert len(acceptor._negotiated) == 2
    assert any(kind == "failed" and "Calling AE Title" in text for kind, text in handler.events)


def test_silent_peers_are_dropped_after_the_acse_and_network_timeouts() -> None:
    """A connection that never sends its A-ASSOCIATE-RQ is closed after ``acse_timeout``; an
    association that goes quiet gets an A-ABORT after ``network_timeout`` (the kernel's receive
    timeout on a plain socket, so no poll before every read)."""
    handler = _Recorder()
    acceptor = Acceptor(
        ("127.0.0.1", 0),
        AcceptorConfig(contexts={CT: (ExplicitVRLittleEndian,)}, acse_timeout=0.5, network_timeout=0.5),
        handler,
    )
    try:
        with socket.create_connection(("127.0.0.1", acceptor.port), timeout=10) as silent:
            pdu_type, body = _read_pdu(silent)  # nothing sent: the node gives up
        assert (pdu_type, body[2]) == (0x07, 2)  # A-ABORT from the service provider
        with _associate(acceptor.port) as quiet:
            quiet.settimeout(10)
            pdu_type, body = _read_pdu(quiet)  # associated, then nothing
        assert (pdu_type, body[2]) == (0x07, 2)
        assert handler.done.wait(10)
    finally:
        acceptor.shutdown()
    assert ("failed", "no A-ASSOCIATE-RQ within acse_timeout") in handler.events
    assert ("ended", "aborted: no data for network_timeout (0.5 s)") in handler.events


def test_tls_handshake_trickled_byte_by_byte_ends_at_the_acse_deadline(tmp_path: Path) -> None:
    """A TLS ClientHello sent one byte every 0.2 s (each receive well inside acse_timeout):
    the handshake and the A-ASSOCIATE-RQ share one deadline, so the connection is closed
    acse_timeout after it was accepted, not after a timeout per byte."""
    require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    procs.run_tool(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key))
    # The ClientHello a real client sends, taken from an in-memory TLS client.
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    handler = _Recorder()
    acceptor = Acceptor(("127.0.0.1", 0), AcceptorConfig(contexts={CT: (ExplicitVRLittleEndian,)},
                                                         acse_timeout=1.0, network_timeout=1.0),
                        handler, ssl_context=server)
    try:
        with socket.create_connection(("127.0.0.1", acceptor.port)) as sock:
            started = time.monotonic()
            closed_after = None
            for i in range(len(hello)):
                try:
                    sock.sendall(hello[i:i + 1])
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                time.sleep(0.2)
        assert closed_after is not None and closed_after < 1.0 + 1.0, closed_after
        assert any(kind == "tls" and "timed out" in text for kind, text in handler.events), handler.events
    finally:
        acceptor.shutdown()
