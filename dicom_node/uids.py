"""UID validation (before a UID becomes a path part) and deterministic result UIDs."""

from __future__ import annotations

import re
import uuid

from dicom_node.errors import InvalidUIDError

# PS3.5 9.1: components of digits separated by '.', no leading zero in a multi-digit
# component, at most 64 characters.  Checked with ``fullmatch``: ``$`` would also match before a
# trailing newline ("1.2.3\n" is not a UID, and would become a folder name with a newline).
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID_RE.fullmatch(value) is not None


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InvalidUIDError` naming it."""
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUIDError(f"{name} is not a valid DICOM UID: {shown}")
    return str(value)


def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root derived only from ``parts`` (same parts -> same UID).

    Result UIDs derive from (source series, model name, model version, role), so a retried
    or re-run job produces the same SEG/SR UIDs and an archive replaces instead of duplicating.
    """
    # A name-based UUID (RFC 4122 v5) under 2.25 (PS3.5 B.2).  pydicom's generate_uid ignores
    # entropy_srcs when prefix is None and returns a random UID, so it cannot be used here.
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(['dicom-node', *parts])).int}"


def random_uid() -> str:
    """A new UID under the 2.25 root from a random UUID (PS3.5 B.2): Transaction UIDs."""
    return f"2.25.{uuid.uuid4().int}"
