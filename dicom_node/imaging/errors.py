"""The loader's error: why a series cannot become a volume."""

from __future__ import annotations

from dicom_node.errors import PermanentError


class SeriesError(PermanentError):
    """The series cannot be turned into one volume; the message says why."""
