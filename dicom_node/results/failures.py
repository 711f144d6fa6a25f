"""Encoder exceptions caused by the source headers, as permanent job failures naming keywords.

highdicom and pydicom raise ``AttributeError``, ``KeyError``, ``ValueError``... on source
headers they cannot use (a missing Study Instance UID, a PatientSex they do not know).  Encoding
is deterministic, so retrying cannot help; and their messages may quote a value (a patient
attribute), so the reason keeps only the DICOM keywords the exception points at.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

from pydicom.datadict import keyword_dict

from dicom_node.results.common import ResultEncodingError

#: What the encoders raise on source headers they cannot use.
ENCODING_INPUT_ERRORS: tuple[type[Exception], ...] = (
    AttributeError, KeyError, ValueError, TypeError, IndexError,
)


def dicom_keywords(exc: BaseException) -> list[str]:
    """The DICOM keywords ``exc`` names (``AttributeError.name``, words of its message, highdicom
    enum names such as ``PatientSexValues``), in order; never any value."""
    words = [getattr(exc, "name", None) or "", *re.findall(r"[A-Z][A-Za-z0-9]+", str(exc))]
    found: list[str] = []
    for word in words:
        for keyword in (word, word.removesuffix("Values")):
            if keyword and keyword in keyword_dict and keyword not in found:
                found.append(keyword)
                break
    return found


def raised_at(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback (no message, no values)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def input_failure(exc: BaseException) -> ResultEncodingError:
    """The permanent failure for an encoder exception raised by the series' headers: the
    reason names the attribute keyword(s) and the exception type, never its message."""
    keywords = dicom_keywords(exc)
    if keywords:
        what = f"attribute {keywords[0]}" if len(keywords) == 1 else f"attributes {', '.join(keywords)}"
        return ResultEncodingError(
            f"the results cannot be encoded: the source images' {what} cannot be used "
            f"({type(exc).__name__} in the SEG/SR encoder)"
        )
    return ResultEncodingError(
        "the results cannot be encoded: the SEG/SR encoder refused the source images' headers "
        f"({type(exc).__name__} at {raised_at(exc)})"
    )
