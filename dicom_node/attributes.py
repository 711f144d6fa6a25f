"""The non-identifying header attributes the node reads from each instance, declared once.

Each line is a DICOM keyword that the listener reads from the header (up to the pixel data),
that the catalog keeps with the series, and, with ``routing=True``, that a routing rule may
match on.  Adding a match key is one line here: the header reader, the catalog and the rule
grammar follow, and ``tests/unit/test_attributes.py`` checks every routing key end to end.
Never a patient's name, ID or birth date: those never leave the file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderAttribute:
    keyword: str
    #: Routing rules may match on it (``[[rules]] match = { Keyword = ... }``).
    routing: bool = True


HEADER_ATTRIBUTES: tuple[HeaderAttribute, ...] = (
    HeaderAttribute("Modality"),
    HeaderAttribute("BodyPartExamined"),
    HeaderAttribute("SeriesDescription"),
    HeaderAttribute("ProtocolName"),
    HeaderAttribute("SliceThickness"),
    HeaderAttribute("Manufacturer"),
    HeaderAttribute("ManufacturerModelName"),
    HeaderAttribute("StationName"),
    HeaderAttribute("ImageType"),
    HeaderAttribute("SeriesNumber", routing=False),
    HeaderAttribute("InstanceNumber", routing=False),
    HeaderAttribute("ImagesInAcquisition", routing=False),
    HeaderAttribute("NumberOfFrames", routing=False),
    HeaderAttribute("NumberOfTemporalPositions", routing=False),
    # Shown with jobs and series so people recognise the study; not identifying on its own.
    HeaderAttribute("StudyDate", routing=False),
)

#: Every keyword read from the header.
HEADER_KEYWORDS: tuple[str, ...] = tuple(a.keyword for a in HEADER_ATTRIBUTES)
#: Header keywords a rule may match on.
ROUTING_KEYWORDS: tuple[str, ...] = tuple(a.keyword for a in HEADER_ATTRIBUTES if a.routing)
#: Match keys the node knows without a header attribute of that name: the SOP class of the series'
#: first instance, the sender's AE title and the instance count.
DERIVED_MATCH_KEYS: tuple[str, ...] = ("SOPClassUID", "CallingAETitle", "InstanceCount")
