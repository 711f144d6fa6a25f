"""File meta encoding on the C-STORE path: ``python -m benchmarks.file_meta``.

The listener writes a preamble and the File Meta Information group in front of every stored
data set.  This times, in the same run, the listener's own encoder
(``dicom_node.ingest.listener.file_meta_bytes``) against pydicom's
``filewriter.write_file_meta_info`` and pynetdicom's ``dsutils.encode_file_meta`` producing the
same bytes, and prints microseconds per call (median and minimum of ``--repeat`` rounds).
Run by hand, not in the test suite.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from io import BytesIO

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.ingest.listener import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    file_meta_bytes,
)

Encoder = Callable[[str, str, str, str], bytes]


def by_pydicom(sop_class: str, sop_instance: str, transfer_syntax: str, ae_title: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae_title:
        meta.SourceApplicationEntityTitle = ae_title
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def by_pynetdicom(sop_class: str, sop_instance: str, transfer_syntax: str, ae_title: str) -> bytes:
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
    )
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae_title:
        meta.SourceApplicationEntityTitle = ae_title
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds")
    args = parser.parse_args()
    call = (CTImageStorage, generate_uid(), ExplicitVRLittleEndian, "CT_SCANNER")
    reference = file_meta_bytes(*call)
    encoders: tuple[tuple[str, Encoder], ...] = (
        ("listener (hand-encoded)", file_meta_bytes),
        ("pydicom write_file_meta_info", by_pydicom),
        ("pynetdicom encode_file_meta", by_pynetdicom),
    )
    medians: dict[str, float] = {}
    for name, encode in encoders:
        if encode(*call) != reference:
            raise SystemExit(f"{name} does not produce the listener's bytes")
        rounds = timeit.repeat(lambda e=encode: e(*call), number=args.number, repeat=args.repeat)  # type: ignore[misc]
        per_call = sorted(r / args.number * 1e6 for r in rounds)
        medians[name] = per_call[len(per_call) // 2]
        print(f"{name:30s} median {medians[name]:8.1f} us  min {per_call[0]:8.1f} us per call")
    hand = medians["listener (hand-encoded)"]
    for name, median in medians.items():
        print(f"{name:30s} {median / hand:6.1f}x the listener's time")


if __name__ == "__main__":
    main()
