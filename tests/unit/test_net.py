"""The hand-encoded C-STORE response is byte for byte what pynetdicom would send."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_node.net import encode_c_store_rsp


def _rsp(status: int, message_id: int, sop_class: str | None, sop_instance: str | None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    out = encode(msg.command_set, True, True)
    assert out is not None
    return out


@pytest.mark.parametrize(
    ("status", "message_id", "sop_class", "sop_instance"),
    [
        (0x0000, 1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"),  # odd-length instance UID
        (0xA700, 65535, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.56"),  # even length
        (0xC211, 7, "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 59),  # 64 characters
        (0xB000, 2, None, None),  # no UIDs at all
    ],
)
def test_c_store_rsp_matches_pynetdicom(
    status: int, message_id: int, sop_class: str | None, sop_instance: str | None
) -> None:
    """The fast encoder yields exactly pynetdicom's command set for status-only responses."""
    rsp = _rsp(status, message_id, sop_class, sop_instance)
    assert encode_c_store_rsp(rsp) == _pynetdicom_bytes(rsp)


def test_c_store_rsp_with_error_comment_is_left_to_pynetdicom() -> None:
    """A response with an Error Comment is not hand-encoded (pynetdicom encodes it)."""
    rsp = _rsp(0xC211, 3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3")
    rsp.ErrorComment = "processing failure"
    assert encode_c_store_rsp(rsp) is None
