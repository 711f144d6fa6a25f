"""What the result encoders require of their input, checked before encoding.

The encoders (highdicom, pydicom) copy the Patient and General Study modules of the source
images into the SEG and SR and raise on a value its VR forbids, quoting the value.  Checking
first lets the job fail with the attribute's keyword (never its value) as a permanent error.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from dicom_node.errors import PermanentError

#: Date/time attributes of the Patient and General Study modules the encoders copy.
COPIED_DATE_TIMES = ("PatientBirthDate", "PatientBirthTime", "StudyDate", "StudyTime")

_PARSERS = {"DA": DA, "DT": DT, "TM": TM}


def check_copied_attributes(sources: Sequence[Dataset]) -> None:
    """Refuse a series whose Patient/Study dates or times the results cannot carry.

    Raises
    ------
    PermanentError
        Naming the attribute by keyword (never its value); retrying cannot help.
    """
    for ds in sources:
        for keyword in COPIED_DATE_TIMES:
            if keyword not in ds:
                continue
            element = ds[keyword]
            parse = _PARSERS.get(element.VR)
            if parse is None or element.value is None or element.value == "":
                continue
            try:
                parse(str(element.value))
            except (ValueError, TypeError):
                raise PermanentError(
                    f"the series' {keyword} is not a valid DICOM {element.VR} value, so the results "
                    f"(which copy it) cannot be encoded; correct it at the source and re-send"
                ) from None
