"""The listener's hand-encoded File Meta Information equals pynetdicom's/pydicom's encoder."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.ingest.listener import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    file_meta_bytes,
)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax", "ae_title"),
    [
        (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "CT_SCANNER"),  # odd-length UID: padded
        (MRImageStorage, "1.2.3.45", ImplicitVRLittleEndian, "MR"),  # even-length UID
        (CTImageStorage, "1.2.826.0.1.3680043.8.498.1" + "2" * 36, JPEG2000Lossless, "A" * 16),
        (CTImageStorage, "1.2.3", DeflatedExplicitVRLittleEndian, ""),  # no calling AE title
    ],
)
def test_file_meta_bytes_equal_pynetdicoms(
    sop_class: str, sop_instance: str, transfer_syntax: str, ae_title: str
) -> None:
    """Byte for byte what pynetdicom's create_file_meta + encode_file_meta give, and pydicom
    reads it back (the listener keeps its own encoder: ~150x faster, benchmarks/file_meta.py)."""
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
    )
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae_title:
        meta.SourceApplicationEntityTitle = ae_title
    ours = file_meta_bytes(sop_class, sop_instance, transfer_syntax, ae_title)
    assert ours == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    read = dcmread(BytesIO(ours), force=True)
    assert read.file_meta.TransferSyntaxUID == transfer_syntax
    assert read.file_meta.MediaStorageSOPInstanceUID == sop_instance
