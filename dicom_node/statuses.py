"""DICOM status codes (PS3.4 Annex B / PS3.7 Annex C) used by the listener and the sender."""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
#: Refused: out of resources (we use it for "disk below the watermark" and write errors).
OUT_OF_RESOURCES: Final = 0xA700
#: Error: Data Set does not match SOP Class (also: inconsistent or invalid UIDs).
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
#: Error: cannot understand (the dataset could not be decoded).
CANNOT_UNDERSTAND: Final = 0xC210
#: Error: processing failure (an unexpected error in the handler; traceback logged).
PROCESSING_FAILURE: Final = 0xC211
#: Warning: coercion of data elements.
COERCION_OF_DATA_ELEMENTS: Final = 0xB000
#: Warning: elements discarded.
ELEMENTS_DISCARDED: Final = 0xB006
#: Warning: Data Set does not match SOP Class.
DATASET_MISMATCH_WARNING: Final = 0xB007


#: Failure Reasons of a Storage Commitment report's Failed SOP Sequence (PS3.4 J.3.3.1.1.2).
COMMITMENT_FAILURE_REASONS: Final = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


def commitment_failure(code: int | None) -> str:
    """``"no such object instance (0x0112)"``: a Failure Reason as the operator reads it."""
    if code is None:
        return "no failure reason given"
    return f"{COMMITMENT_FAILURE_REASONS.get(code, 'failure')} (0x{code:04X})"


def is_success(status: int) -> bool:
    """True for 0x0000."""
    return status == SUCCESS


def is_warning(status: int) -> bool:
    """True for the storage warning range 0xB000-0xBFFF (and 0x0001)."""
    return status == 0x0001 or 0xB000 <= status <= 0xBFFF


def is_out_of_resources(status: int) -> bool:
    """True for 0xA700-0xA7FF (refused: out of resources), which is worth retrying."""
    return 0xA700 <= status <= 0xA7FF


def describe(status: int) -> str:
    """A short human-readable name for ``status`` (for logs and error messages)."""
    names = {
        SUCCESS: "success",
        OUT_OF_RESOURCES: "refused: out of resources",
        DATASET_DOES_NOT_MATCH_SOP_CLASS: "error: data set does not match SOP class",
        CANNOT_UNDERSTAND: "error: cannot understand",
        PROCESSING_FAILURE: "error: processing failure",
        0x0122: "refused: SOP class not supported",
        0x0124: "refused: not authorized",
        0x0211: "unrecognized operation",
        COERCION_OF_DATA_ELEMENTS: "warning: coercion of data elements",
        ELEMENTS_DISCARDED: "warning: elements discarded",
        DATASET_MISMATCH_WARNING: "warning: data set does not match SOP class",
    }
    if status in names:
        return f"0x{status:04X} ({names[status]})"
    if is_out_of_resources(status):
        return f"0x{status:04X} (refused: out of resources)"
    if 0xA900 <= status <= 0xA9FF:
        return f"0x{status:04X} (error: data set does not match SOP class)"
    if 0xC000 <= status <= 0xCFFF:
        return f"0x{status:04X} (error: cannot understand)"
    if is_warning(status):
        return f"0x{status:04X} (warning)"
    return f"0x{status:04X}"
