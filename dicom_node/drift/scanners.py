"""Which scanner made a series: a normalised, bounded, non-identifying name.

The identity is (Manufacturer, ManufacturerModelName, StationName, protocol), the protocol
being ProtocolName, else SeriesDescription, normalised (case folded, digits and punctuation
dropped, blanks collapsed) so "Chest 1.0 B30f" and "CHEST 2.0 B30F" are one protocol.  None of
these attributes identify a patient; StationName is cut to 16 characters anyway, and the
label that metrics carry is the station (or model) name cut to 12 characters plus 6 hex digits of
a hash of the whole identity: short, stable across restarts, unique in practice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from dicom_node.catalog.drift import ScannerIdentity

_NOT_WORD = re.compile(r"[^a-z]+")
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).split())


def normalise_protocol(value: Any) -> str:
    """Case folded words of a protocol or series description, without digits or punctuation."""
    return " ".join(_NOT_WORD.sub(" ", _text(value).casefold()).split())[:64]


def scanner_identity(headers: Mapping[str, Any]) -> ScannerIdentity:
    """The scanner of a series from its header attributes (by DICOM keyword)."""
    manufacturer = _text(headers.get("Manufacturer"))[:64]
    model_name = _text(headers.get("ManufacturerModelName"))[:64]
    station = _text(headers.get("StationName"))[:16]
    protocol = normalise_protocol(headers.get("ProtocolName") or headers.get("SeriesDescription"))
    whole = "\x1f".join((manufacturer.casefold(), model_name.casefold(), station.casefold(), protocol))
    digest = hashlib.sha256(whole.encode()).hexdigest()
    name = _LABEL_CHARS.sub("_", station or model_name or manufacturer or "unknown")[:12].strip("_") or "unknown"
    return ScannerIdentity(key=digest[:40], label=f"{name}-{digest[:6]}", manufacturer=manufacturer,
                           model_name=model_name, station=station, protocol=protocol)
