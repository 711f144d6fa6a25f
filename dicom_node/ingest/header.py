"""The few header elements the listener needs, read from a received data set as it arrived.

A C-STORE data set comes as bytes in the negotiated transfer syntax.  The listener needs its
UIDs (to check them against the request and to place the file) and the catalog attributes
(:data:`~dicom_node.ingest.CATALOG_ATTRIBUTES`), nothing else: no element is converted to a
Python value unless it is one of these, and pixel data is never touched.

Little endian data sets (nearly all) are walked by :func:`scan_elements`, which only reads
each element's tag and length up to the pixel data: 50-59 us per 512x512 CT data set against
98-135 us with pydicom's reader (``benchmarks/header.py``, docs/performance.md), on the path
of every C-STORE.
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
    ExplicitVRLittleEndian,
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
    """The fast scanner met something it leaves to pydicom's reader (elements out of order)."""


class _Malformed(_Unusual):
    """The bytes are not a data set in the negotiated encoding: no reader could make sense of
    them (a value or item past the end, a VR that is none, an undelimited sequence)."""


#: Sequences nested deeper than this are refused (a stack-exhaustion attack, not an image).
MAX_SEQUENCE_DEPTH: Final = 32


class _Walk:
    """One walk over a data set: its byte order, VR encoding and what was found."""

    __slots__ = ("data", "explicit", "found", "long_length", "short", "tag", "tag_length", "unordered")

    def __init__(self, data: memoryview, explicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.data = data
        self.explicit = explicit
        self.tag = _TAG if little else struct.Struct(">HH")
        self.tag_length = _TAG_LENGTH if little else struct.Struct(">HHL")
        self.short = _EXPLICIT if little else struct.Struct(">HH2sH")
        self.long_length = _LONG_LENGTH if little else struct.Struct(order + "L")
        self.found: dict[int, RawValue] = {}
        self.unordered = False

    def header(self, pos: int, explicit: bool) -> tuple[bytes | None, int, int]:
        """The VR (None when implicit), value length and value offset of the element at ``pos``."""
        if not explicit:
            return None, self.tag_length.unpack_from(self.data, pos)[2], pos + 8
        vr, length = self.short.unpack_from(self.data, pos)[2:]
        if vr in _SHORT_VRS:
            return vr, length, pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > len(self.data):
                raise _Malformed("element header truncated")
            return vr, self.long_length.unpack_from(self.data, pos + 8)[0], pos + 12
        raise _Malformed(f"not a VR: {vr!r}")

    def sequence(self, pos: int, end: int, explicit: bool, walk: bool, depth: int) -> int:
        """Walk a sequence's items from ``pos`` up to its sequence delimitation (``end`` < 0:
        undefined length) or exactly to ``end``; return the offset just past it.

        ``walk``: the items hold data sets, walked element by element (encapsulated pixel data
        holds fragments, only skipped).
        """
        data = self.data
        limit = len(data) if end < 0 else end
        if depth > MAX_SEQUENCE_DEPTH:
            raise _Malformed("sequences nested too deep")
        while True:
            if end >= 0 and pos == end:
                return pos
            if pos + 8 > limit:
                raise _Malformed("sequence not delimited" if end < 0 else "item past its sequence")
            group, element, length = self.tag_length.unpack_from(data, pos)
            pos += 8
            if group != 0xFFFE:
                raise _Malformed("not an item")
            if element == 0xE0DD and end < 0:  # sequence delimitation
                return pos
            if element != 0xE000:
                raise _Malformed("not an item")
            if length == _UNDEFINED:
                if not walk:
                    raise _Malformed("fragment of undefined length")
                pos = self.elements(pos, -1, explicit, depth + 1)
                continue
            if pos + length > limit:
                raise _Malformed("item past the end")
            if walk:
                self.elements(pos, pos + length, explicit, depth + 1)
            pos += length

    def elements(self, pos: int, end: int, explicit: bool, depth: int) -> int:
        """Walk the elements from ``pos`` exactly to ``end`` (a data set, an item of defined
        length) or up to an item delimitation (``end`` < 0); return the offset past them.
        The :data:`WANTED_TAGS` of the top level (``depth`` 0) are kept in :attr:`found`."""
        data = self.data
        limit = len(data) if end < 0 else end
        last = -1
        while True:
            if pos == end:
                return pos
            if pos + 8 > limit:
                raise _Malformed("element header truncated" if end >= 0 else "item not delimited")
            group, element = self.tag.unpack_from(data, pos)
            if group == 0xFFFE:
                if end < 0 and element == 0xE00D:  # item delimitation
                    return pos + 8
                if depth == 0 and element == 0xE0DD and not self.tag_length.unpack_from(data, pos)[2]:
                    # A stray sequence delimitation after encapsulated pixel data: pydicom
                    # writes one more after a value that already ends with its own.
                    pos += 8
                    continue
                raise _Malformed("item tag among elements")
            tag = group << 16 | element
            if tag <= last:
                self.unordered = True
            last = tag
            vr, length, pos = self.header(pos, explicit)
            if pos > limit:
                raise _Malformed("element header truncated")
            if length == _UNDEFINED:
                pixels = tag in _PIXEL_TAGS
                if vr is not None and vr not in (b"SQ", b"UN") and not (
                    pixels and vr in (b"OB", b"OW")
                ):
                    raise _Malformed("undefined length outside a sequence")
                # UN of undefined length holds implicit VR little endian (PS3.5 6.2.2); pixel
                # data of undefined length is encapsulated: fragments, not data sets.
                pos = self.sequence(
                    pos, -1, explicit and vr != b"UN", vr == b"SQ" or not pixels, depth
                )
                continue
            if pos + length > limit:
                raise _Malformed("value past the end")
            if vr == b"SQ" and length:
                self.sequence(pos, pos + length, explicit, True, depth)
            elif depth == 0 and tag in WANTED_TAGS:
                self.found[tag] = (
                    None if vr is None else vr.decode("ascii"), bytes(data[pos:pos + length])
                )
            pos += length


def walk(data: bytes | bytearray | memoryview, explicit: bool, little: bool = True) -> _Walk:
    """Walk a whole data set to its last byte, reading only tags and lengths.

    Every element, every item of every sequence (defined or undefined length, nested) and every
    fragment of encapsulated pixel data must fit exactly, with a valid VR when ``explicit``.
    Values (pixel data too) are jumped over, never read.  Sequences of defined length are walked
    in explicit VR; in implicit VR a value's length is all there is to check.

    Raises
    ------
    _Malformed
        When the bytes are not a data set in this encoding (the caller refuses them).
    """
    view = memoryview(data).cast("B")
    found = _Walk(view, explicit, little)
    found.elements(0, len(view), explicit, 0)
    return found


def scan_elements(data: bytes | bytearray | memoryview, explicit: bool) -> dict[int, RawValue]:
    """The :data:`WANTED_TAGS` elements of a little endian data set, as ``tag: (VR, bytes)``,
    once :func:`walk` found the whole data set well formed.

    Raises
    ------
    _Malformed
        When the bytes are not a data set in this encoding (the caller refuses them).
    _Unusual
        For elements out of order (the caller asks pydicom for the values instead).
    """
    walked = walk(data, explicit)
    if walked.unordered:
        raise _Unusual("elements out of order")
    return walked.found


# -- pydicom's reader: everything else ---------------------------------------------------------
def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


class DataSetTooLargeError(PermanentError):
    """A data set larger than the listener's ``max_instance_mb`` (inflated, for deflate)."""


#: Inflated in steps of this size (and each step dropped) while measuring a deflated data set.
_INFLATE_STEP: Final = 1 << 20


def inflate(data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """A Deflated Explicit VR Little Endian data set's bytes inflated, at most ``limit`` bytes.

    The inflated size is measured first in 1 MiB steps that are dropped at once, so a
    "decompression bomb" (a few MB that inflate to GBs) is refused having used 1 MiB of memory;
    only a data set within ``limit`` is then inflated in full.

    Raises
    ------
    DataSetTooLargeError
        When it inflates to more than ``limit`` bytes.
    ValueError
        When the deflate stream is not one (zlib.error), is truncated or has bytes after its end.
    """
    measure = zlib.decompressobj(-zlib.MAX_WBITS)
    size = len(measure.decompress(data, _INFLATE_STEP))
    while measure.unconsumed_tail and size <= limit:
        size += len(measure.decompress(measure.unconsumed_tail, _INFLATE_STEP))
    if size <= limit and not measure.eof:
        size += len(measure.flush())
    if size > limit:
        raise DataSetTooLargeError(
            f"the deflated data set inflates to more than {limit >> 20} MiB (max_instance_mb)"
        )
    if not measure.eof:
        raise ValueError("the deflate stream is truncated")
    if measure.unused_data:
        raise ValueError("bytes after the end of the deflate stream")
    return zlib.decompress(data, -zlib.MAX_WBITS)


def read_header(stream: BinaryIO, transfer_syntax: str, limit: int | None = None) -> Dataset:
    """Parse only the elements the listener needs (UIDs, catalog attributes) with pydicom.

    ``stream`` holds the data set as received (no file meta) in ``transfer_syntax``; reading
    stops before the pixel data, so pixel bytes are never touched.  A deflated data set is
    inflated up to ``limit`` bytes (:func:`inflate`).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        stream.seek(0)
        stream = BytesIO(inflate(stream.read(), _NO_LIMIT if limit is None else limit))
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    stream.seek(0)
    return read_dataset(
        stream, implicit, little, stop_when=_at_pixel_data, specific_tags=_HEADER_TAGS
    )


_NO_LIMIT: Final = 1 << 62


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


def values_by_pydicom(
    data: bytes | bytearray | memoryview, transfer_syntax: str,
) -> tuple[dict[str, str | None], dict[str, str | int | float]]:
    """The UIDs and catalog attributes as pydicom's reader gives them (:func:`read_header`):
    :func:`parse_header`'s answer for big endian data sets and elements out of order."""
    return header_values(_raw_values(read_header(BytesIO(data), transfer_syntax)))


def parse_header(
    data: bytes | bytearray | memoryview, transfer_syntax: str, *, max_inflated: int | None = None,
) -> tuple[dict[str, str | None], dict[str, str | int | float]]:
    """The UIDs and catalog attributes of a data set received in ``transfer_syntax``, once the
    whole data set is known to parse in that syntax.

    Every data set (a deflated one once inflated, within ``max_inflated`` bytes) is walked to its
    last byte by :func:`walk` in the negotiated byte order and VR encoding; the values come from
    that walk, or from pydicom's reader for big endian and for elements out of order.

    Raises
    ------
    DataSetTooLargeError
        When a deflated data set inflates beyond ``max_inflated`` bytes.
    UndecodableDatasetError
        When the bytes are not a data set in ``transfer_syntax`` (truncated, garbage, absurd
        lengths, the other VR encoding...), naming the transfer syntax and what went wrong.
    """
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            data = inflate(data, _NO_LIMIT if max_inflated is None else max_inflated)
            transfer_syntax_read: str = ExplicitVRLittleEndian
        else:
            transfer_syntax_read = transfer_syntax
        implicit = transfer_syntax_read == ImplicitVRLittleEndian
        # Every other syntax than big endian, encapsulated (compressed) ones too, is little endian.
        walked = walk(data, not implicit, transfer_syntax_read != ExplicitVRBigEndian)
        if transfer_syntax_read == ExplicitVRBigEndian or walked.unordered:
            # Well formed, but its values are pydicom's to read (byte order, duplicates).
            return values_by_pydicom(data, transfer_syntax_read)
        return header_values(walked.found)
    except DataSetTooLargeError:
        raise
    except Exception as exc:  # untrusted bytes: pydicom/zlib/struct raise a dozen types here
        raise UndecodableDatasetError(
            f"the data set cannot be decoded as {transfer_syntax}: {type(exc).__name__}: {exc}"[:300]
        ) from exc
