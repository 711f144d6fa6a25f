"""The DICOM upper layer's wire format as the acceptor needs it (PS3.8 §9.3, PS3.7 §9.3): PDU
and DIMSE command constants, the few PDUs and response command sets it writes, and the command
elements and AE titles it reads.  Kept apart from :mod:`dicom_node.ingest.acceptor` (the
protocol's state) and :mod:`dicom_node.ingest.connection` (the socket) so each reads on its own.
"""

from __future__ import annotations

import struct
from typing import Final, cast

from pynetdicom.utils import decode_bytes, set_ae

# PDU types (PS3.8 §9.3.1).
A_ASSOCIATE_RQ_PDU: Final = 0x01
A_ASSOCIATE_AC_PDU: Final = 0x02
A_ASSOCIATE_RJ_PDU: Final = 0x03
P_DATA_TF_PDU: Final = 0x04
A_RELEASE_RQ_PDU: Final = 0x05
A_RELEASE_RP_PDU: Final = 0x06
A_ABORT_PDU: Final = 0x07

# A-ABORT reasons when the source is the service provider (PS3.8 Table 9-26).
ABORT_NOT_SPECIFIED: Final = 0x00
ABORT_UNRECOGNIZED_PDU: Final = 0x01
ABORT_UNEXPECTED_PDU: Final = 0x02
ABORT_INVALID_PDU_PARAMETER: Final = 0x06

# DIMSE command fields (PS3.7 §E.1).
C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
C_CANCEL_RQ: Final = 0x0FFF
N_EVENT_REPORT_RQ: Final = 0x0100
#: Command Data Set Type value meaning "no data set follows".
NO_DATA_SET: Final = 0x0101
#: Status for a DIMSE operation the SCP does not provide (PS3.7 §C.5).
UNRECOGNIZED_OPERATION: Final = 0x0211
PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
_ELEMENT_HEADER = struct.Struct("<HHI")


# -- encoding ----------------------------------------------------------------------------------
def _pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, len(body)) + body


def abort_pdu(reason: int, source: int = 2) -> bytes:
    """An A-ABORT PDU (source 2: service provider, 0: service user)."""
    return _pdu(A_ABORT_PDU, bytes((0, 0, source, reason)))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    return _pdu(A_ASSOCIATE_RJ_PDU, bytes((0, result, source, reason)))


RELEASE_RP: Final = _pdu(A_RELEASE_RP_PDU, b"\x00" * 4)


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii", "replace")
    return value + b"\x00" if len(value) % 2 else value


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
    error_comment: str | None = None,
    event_type_id: int | None = None,
) -> bytes:
    """A DIMSE response command set (Implicit VR Little Endian, group length first, PS3.7 §9.3).

    ``command_field`` is the request's; the response's is ``command_field | 0x8000``.
    """
    parts = []
    if sop_class_uid:
        parts.append(_element(0x0002, _uid_value(sop_class_uid)))
    parts.append(_element(0x0100, struct.pack("<H", command_field | 0x8000)))
    parts.append(_element(0x0120, struct.pack("<H", message_id)))
    parts.append(_element(0x0800, struct.pack("<H", NO_DATA_SET)))
    parts.append(_element(0x0900, struct.pack("<H", status)))
    if error_comment:
        text = error_comment[:64].encode("ascii", "replace").replace(b"\\", b"/")
        parts.append(_element(0x0902, text + b" " if len(text) % 2 else text))
    if sop_instance_uid:
        parts.append(_element(0x1000, _uid_value(sop_instance_uid)))
    if event_type_id is not None:
        parts.append(_element(0x1002, struct.pack("<H", event_type_id)))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def p_data_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """``command`` as P-DATA-TF PDUs, one PDV each, none longer than ``peer_max_pdu``."""
    room = peer_max_pdu - 6 if peer_max_pdu else len(command)
    room = max(room, 2)
    out = []
    for start in range(0, len(command), room):
        fragment = command[start:start + room]
        last = start + room >= len(command)
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, 0x03 if last else 0x01) + fragment
        out.append(_pdu(P_DATA_TF_PDU, pdv))
    return b"".join(out)


def decode_command(data: bytes) -> dict[int, bytes]:
    """The elements of a DIMSE command set (Implicit VR Little Endian, group 0000) by element.

    Raises
    ------
    ValueError
        When an element runs past the end or is not in group 0000.
    """
    out: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise ValueError("command set truncated inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ValueError(f"bad command element ({group:04X},{element:04X}) length {length}")
        out[element] = data[offset:offset + length]
        offset += length
    return out


def decode_ae_title(raw: bytes | bytearray, which: str) -> str:
    """An AE title field read as pynetdicom reads it (ASCII, or its fallback codecs; leading and
    trailing spaces not significant) and validated the same way.

    Raises
    ------
    ValueError
        For a title of spaces only, or one with characters an AE title may not hold.
    """
    value = decode_bytes(bytes(raw)).strip()
    if not value:
        raise ValueError(f"Invalid '{which} AE Title' value - must not consist entirely of spaces")
    return cast(str, set_ae(value, f"{which} AE Title", False, False))


def decode_text(value: bytes | None) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace") if value else ""


def decode_us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None
