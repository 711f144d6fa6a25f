"""The few header elements the listener needs, read from a received data set as it arrived.

A C-STORE data set comes as bytes in the negotiated transfer syntax.  The listener needs its
UIDs (to check them against the request and to place the file) and the catalog attributes
(:data:`~dicom_node.ingest.CATALOG_ATTRIBUTES`), nothing else: no element is converted to a
Python value unless it is one of these, and pixel data is never touched.

Little endian data sets (nearly all) are walked by :func:`scan_elements`, which only reads
each element's tag and length up to the pixel data: 39-41 us per CT header against 102-119 us
with pydicom's reader (``tests/unit/test_header.py`` data sets), on the path of every C-STORE.
Anything it does not expect (big endian, deflate, elements out of order, a VR that is not one,
a length past the end) goes to pydicom's reader, which decides.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from io import BytesIO
from typing import BinaryIO, Final, cast

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.errors import PermanentError
from dicom_node.ingest.events import CATALOG_ATTRIBUTES

#: The UIDs read from every data set.
UID_KEYWORDS: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TAGS: dict[str, int] = {
    k: cast(int, tag_for_keyword(k))
    for k in ("SpecificCharacterSet", *UID_KEYWORDS, *CATALOG_ATTRIBUTES)
}
#: The tags read from a data set's header (everything else is skipped).
WANTED_TAGS: Final = frozenset(_TAGS.values())
_HEADER_TAGS: list[BaseTag | int] = [Tag(t) for t in _TAGS.values()]
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})

#: One element's VR (None: implicit VR) and value as received.
RawValue = tuple[str | None, object]


class UndecodableDatasetError(PermanentError):
    """A received data set whose header cannot be parsed in its transfer syntax (0xC210)."""


# -- the fast path: little endian data sets ----------------------------------------------------
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
                        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_UNDEFINED: Final = 0xFFFFFFFF
_TAG = struct.Struct("<HH")
_TAG_LENGTH = struct.Struct("<HHL")
_EXPLICIT = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")


class _Unusual(Exception):
    """The fast scanner met something it leaves to pydicom's reader."""


def _element_header(data: memoryview, pos: int, explicit: bool) -> tuple[bytes | None, int, int]:
    """The VR (None when implicit), value length and value offset of the element at ``pos``."""
    if not explicit:
        return None, _TAG_LENGTH.unpack_from(data, pos)[2], pos + 8
    vr, length = _EXPLICIT.unpack_from(data, pos)[2:]
    if vr in _SHORT_VRS:
        return vr, length, pos + 8
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Unusual("element header truncated")
        return vr, _LONG_LENGTH.unpack_from(data, pos + 8)[0], pos + 12
    raise _Unusual(f"not a VR: {vr!r}")


def _skip_sequence(data: memoryview, pos: int, explicit: bool) -> int:
    """The offset just past the undefined-length sequence whose items start at ``pos``."""
    end = len(data)
    while True:
        if pos + 8 > end:
            raise _Unusual("sequence not delimited")
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        pos += 8
        if group != 0xFFFE:
            raise _Unusual("not an item")
        if element == 0xE0DD:  # sequence delimitation
            return pos
        if element != 0xE000:
            raise _Unusual("not an item")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimitation
            if pos + 8 > end:
                raise _Unusual("item not delimited")
            group, element = _TAG.unpack_from(data, pos)
            if group == 0xFFFE:
                if element != 0xE00D:
                    raise _Unusual("not an item delimitation")
                pos += 8
                break
            vr, length, pos = _element_header(data, pos, explicit)
            if length == _UNDEFINED:
                # UN of undefined length holds implicit VR little endian (PS3.5 6.2.2).
                pos = _skip_sequence(data, pos, explicit and vr != b"UN")
            else:
                pos += length


def scan_elements(data: bytes | bytearray | memoryview, explicit: bool) -> dict[int, RawValue]:
    """The :data:`WANTED_TAGS` elements of a little endian data set, as ``tag: (VR, bytes)``.

    Walks the top-level elements up to the pixel data (or the end), reading only tags and
    lengths; sequences of undefined length are skipped item by item.

    Raises
    ------
    _Unusual
        For anything a well-formed data set does not hold (the caller asks pydicom instead).
    """
    view = memoryview(data).cast("B")
    end = len(view)
    found: dict[int, RawValue] = {}
    pos, last = 0, -1
    while pos < end:
        if pos + 8 > end:
            raise _Unusual("element header truncated")
        group, element = _TAG.unpack_from(view, pos)
        tag = group << 16 | element
        if tag <= last:
            raise _Unusual("elements out of order")
        if tag in _PIXEL_TAGS:
            break
        last = tag
        vr, length, pos = _element_header(view, pos, explicit)
        if length == _UNDEFINED:
            if vr is not None and vr not in (b"SQ", b"UN"):
                raise _Unusual("undefined length outside a sequence")
            pos = _skip_sequence(view, pos, explicit and vr != b"UN")
            continue
        if pos + length > end:
            raise _Unusual("value past the end")
        if tag in WANTED_TAGS:
            found[tag] = (None if vr is None else vr.decode("ascii"), bytes(view[pos:pos + length]))
        pos += length
    return found


# -- pydicom's reader: everything else ---------------------------------------------------------
def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_header(stream: BinaryIO, transfer_syntax: str) -> Dataset:
    """Parse only the elements the listener needs (UIDs, catalog attributes) with pydicom.

    ``stream`` holds the data set as received (no file meta) in ``transfer_syntax``; reading
    stops before the pixel data, so pixel bytes are never touched.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        stream.seek(0)
        stream = BytesIO(zlib.decompress(stream.read(), -zlib.MAX_WBITS))
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    stream.seek(0)
    return read_dataset(
        stream, implicit, little, stop_when=_at_pixel_data, specific_tags=_HEADER_TAGS
    )


def _raw_values(header: Dataset) -> dict[int, RawValue]:
    found: dict[int, RawValue] = {}
    for tag in WANTED_TAGS:
        elem = header.get_item(tag)
        if elem is not None:
            found[tag] = (elem.VR, elem.value)
    return found


# -- values ------------------------------------------------------------------------------------
def _element_text(elements: Mapping[int, RawValue], tag: int, encodings: list[str]) -> str | None:
    """The raw value of a string element as text (no pydicom value conversion, ~10x faster)."""
    vr, value = elements.get(tag, (None, None))
    if value is None:
        return None
    if not isinstance(value, bytes):
        # Already converted (or a non-string VR): format what pydicom gives us.
        if isinstance(value, MultiValue | list | tuple):
            return "\\".join(str(v) for v in value)
        return str(value)
    vr = vr or dictionary_VR(tag)
    if vr == "UI":
        return value.rstrip(b"\x00 ").decode("ascii", "replace")
    text = decode_bytes(value, encodings, {0x5C}) if vr in _TEXT_VRS else value.decode(
        "ascii", "replace"
    )
    return "\\".join(part.strip(" \x00") for part in text.split("\\"))


def header_values(
    elements: Mapping[int, RawValue],
) -> tuple[dict[str, str | None], dict[str, str | int | float]]:
    """The UIDs (:data:`UID_KEYWORDS`) and catalog attributes found among raw elements.

    Numbers become ``int`` (IS) or ``float`` (DS); multi-valued strings stay ``a\\b``;
    values that do not parse are left out (they are optional catalog hints).
    """
    charset = _element_text(elements, 0x00080005, ["iso8859"])
    encodings = convert_encodings(charset.split("\\") if charset else None)
    uids = {k: _element_text(elements, _TAGS[k], encodings) for k in UID_KEYWORDS}
    attributes: dict[str, str | int | float] = {}
    for keyword in CATALOG_ATTRIBUTES:
        tag = _TAGS[keyword]
        try:
            text = _element_text(elements, tag, encodings)
            if not text:
                continue
            vr = dictionary_VR(tag)
            if vr == "IS":
                attributes[keyword] = int(float(text.split("\\")[0]))
            elif vr == "DS":
                attributes[keyword] = float(text.split("\\")[0])
            else:
                attributes[keyword] = text
        except Exception:  # noqa: S112 - a malformed optional attribute is not worth a refusal
            continue
    return uids, attributes


def parse_header(
    data: bytes | bytearray | memoryview, transfer_syntax: str
) -> tuple[dict[str, str | None], dict[str, str | int | float]]:
    """The UIDs and catalog attributes of a data set received in ``transfer_syntax``.

    Raises
    ------
    UndecodableDatasetError
        When the bytes are not a data set in ``transfer_syntax`` (truncated, garbage, absurd
        lengths...), naming the transfer syntax and what went wrong.
    """
    try:
        if transfer_syntax not in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
            # Every other syntax, encapsulated (compressed) ones included, is little endian.
            try:
                return header_values(
                    scan_elements(data, transfer_syntax != ImplicitVRLittleEndian)
                )
            except _Unusual:
                pass
        return header_values(_raw_values(read_header(BytesIO(data), transfer_syntax)))
    except Exception as exc:  # untrusted bytes: pydicom/zlib/struct raise a dozen types here
        raise UndecodableDatasetError(
            f"the data set cannot be decoded as {transfer_syntax}: {type(exc).__name__}: {exc}"[:300]
        ) from exc
