"""The listener's header reader: the fast little endian scanner gives exactly what pydicom's
reader gives, on the data sets scanners and archives send (sequences of undefined length,
private groups, UN, character sets, empty Type 2 values, compressed syntaxes), and leaves
anything unusual to pydicom."""

from __future__ import annotations

import struct
import warnings
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicom_node.ingest.header import (
    RawValue,
    UndecodableDatasetError,
    _raw_values,
    _Unusual,
    header_values,
    parse_header,
    read_header,
    scan_elements,
    values_by_pydicom,
)
from tests.support.headers import encode_dataset, plain_ct, vendor_ct

_UN_OF_UNDEFINED_LENGTH = b"".join((
    struct.pack("<HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF),
    struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF),  # item of undefined length, implicit VR inside
    struct.pack("<HHL", 0x0008, 0x0100, 4), b"ABCD",
    struct.pack("<HHL", 0x0008, 0x1140, 0xFFFFFFFF),  # a nested sequence of undefined length
    struct.pack("<HHL", 0xFFFE, 0xE000, 10), struct.pack("<HHL", 0x0008, 0x1150, 2), b"1\x00",
    struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),
    struct.pack("<HHL", 0xFFFE, 0xE00D, 0),
    struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),
))


def _with_un_sequence(ds: Dataset) -> bytes:
    """``ds`` explicit VR little endian with a private UN element of undefined length (a
    sequence re-encoded by an archive that did not know it) between groups 0008 and 0018."""
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < 0x00090000 else after).add(elem)
    return encode_dataset(before) + _UN_OF_UNDEFINED_LENGTH + encode_dataset(after)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("make", [plain_ct, vendor_ct], ids=["plain", "vendor"])
def test_the_scanner_reads_what_pydicom_reads(make: object, implicit: bool) -> None:
    """On well-formed headers the fast path is taken and gives pydicom's values exactly."""
    ds = make()  # type: ignore[operator]
    body = encode_dataset(ds, implicit=implicit)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    scan_elements(body, not implicit)  # no _Unusual: the fast path is taken
    uids, attributes = parse_header(body, syntax)
    assert (uids, attributes) == values_by_pydicom(body, syntax)
    assert uids["SOPInstanceUID"] == ds.SOPInstanceUID
    assert uids["SeriesInstanceUID"] == ds.SeriesInstanceUID


def test_vendor_values_come_out_decoded() -> None:
    """Multi-valued strings stay joined, Latin-1 is decoded, empty Type 2 values are left out."""
    ds = vendor_ct()
    _, attributes = parse_header(encode_dataset(ds), ExplicitVRLittleEndian)
    assert attributes["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL\\CT_SOM5 SPI"
    assert attributes["SeriesDescription"] == "Thorax nativ Lunge éà 1.0 B70f"
    assert "BodyPartExamined" not in attributes and "SeriesNumber" not in attributes
    assert attributes["Modality"] == "CT" and attributes["SliceThickness"] == pytest.approx(float(ds.SliceThickness))


def test_a_un_element_of_undefined_length_is_skipped_as_implicit_items() -> None:
    """UN of undefined length holds implicit VR items (PS3.5 6.2.2): skipped, values agree."""
    body = _with_un_sequence(vendor_ct())
    scan_elements(body, True)
    assert parse_header(body, ExplicitVRLittleEndian) == values_by_pydicom(body, ExplicitVRLittleEndian)


def test_compressed_syntaxes_and_data_sets_without_pixels_take_the_fast_path() -> None:
    """An encapsulated (JPEG) data set's header is explicit VR little endian; an SR has no pixels."""
    ds = plain_ct()
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00\xff\xd8\xff\xd9" \
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    body = encode_dataset(ds)
    scan_elements(body, True)
    assert parse_header(body, JPEGBaseline8Bit) == values_by_pydicom(body, ExplicitVRLittleEndian)
    del ds.PixelData
    assert parse_header(encode_dataset(ds), ExplicitVRLittleEndian)[0]["SOPInstanceUID"] == ds.SOPInstanceUID


def test_big_endian_and_deflated_go_to_pydicom() -> None:
    """Retired big endian and deflated data sets are read by pydicom, with the same values."""
    import zlib

    ds = vendor_ct()
    little = parse_header(encode_dataset(ds), ExplicitVRLittleEndian)
    assert parse_header(encode_dataset(ds, little=False), ExplicitVRBigEndian) == little
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflate.compress(encode_dataset(ds)) + deflate.flush()
    assert parse_header(deflated, DeflatedExplicitVRLittleEndian) == little


def test_elements_out_of_order_are_left_to_pydicom() -> None:
    """A header whose tags go backwards is not the scanner's to judge: pydicom reads it."""
    ds = plain_ct()
    first, rest = Dataset(), Dataset()
    for elem in ds:
        (first if elem.tag >> 16 == 0x0020 else rest).add(elem)
    body = encode_dataset(first) + encode_dataset(rest)  # group 0020 before group 0008
    with pytest.raises(_Unusual, match="out of order"):
        scan_elements(body, True)
    uids, _ = parse_header(body, ExplicitVRLittleEndian)
    assert uids["SeriesInstanceUID"] == ds.SeriesInstanceUID


def test_garbage_is_refused_as_undecodable() -> None:
    """A sequence with no items: the scanner steps aside, pydicom fails, and the listener's
    error is raised (answered 0xC210)."""
    with pytest.raises(UndecodableDatasetError, match="cannot be decoded as"):
        parse_header(b"\x08\x00\x16\x00SQ\x00\x00\xff\xff\xff\xff" + b"x" * 20, ExplicitVRLittleEndian)


_BODY = encode_dataset(vendor_ct())
_UN_BODY = _with_un_sequence(vendor_ct())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.sampled_from([_BODY, _UN_BODY]),
    edits=st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_whenever_the_scanner_answers_pydicom_agrees(
    body: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    """On damaged headers the scanner either steps aside (_Unusual) or gives what pydicom gives
    (pydicom may also reject what the scanner never reads: values past the last wanted tag are
    not looked at, only walked)."""
    data = bytearray(body)
    for at, value in edits:
        data[at % len(data)] = value
    if cut is not None:
        del data[cut:]
    try:
        elements = scan_elements(bytes(data), True)
    except _Unusual:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            raw = _raw_values(read_header(BytesIO(bytes(data)), ExplicitVRLittleEndian))
        except Exception:  # pydicom refusing is one of the two allowed outcomes
            return
        assert _outcome(elements) == _outcome(raw)


def _outcome(elements: dict[int, RawValue]) -> object:
    """The values, or the type of error (a character set that is none raises either way)."""
    try:
        return header_values(elements)
    except Exception as exc:  # compared, not hidden
        return type(exc)
