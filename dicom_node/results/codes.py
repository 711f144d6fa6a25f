"""Coded concepts used by the result encoders (each one checked against PS3.16 or pydicom's tables).

``inference`` speaks its own small :class:`inference.prediction.Code`; :func:`coded` turns it
into highdicom's :class:`~highdicom.sr.CodedConcept`.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from inference.prediction import Code

#: Algorithm family of every segment and measurement group (CID 7162, DCM 123110).
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence

#: How sure the model is of a lesion, as in the CAD SR templates (TID 4104/4108): a NUM
#: ``(111012, DCM, "Certainty of Finding")`` in percent.  "Probability of cancer" (111047) would
#: claim malignancy, which a detection confidence does not.
CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")
PERCENT = CodedConcept("%", "UCUM", "percent")

#: Centre of a lesion (SCOORD3D POINT): ``(111010, DCM, "Center")`` (CID 219 geometry purpose).
CENTER = CodedConcept("111010", "DCM", "Center")

#: Purpose of the Contributing Equipment item that describes the model (CID 7005).
PROCESSING_EQUIPMENT = CodedConcept("109102", "DCM", "Processing Equipment")

#: Nothing found: "Presence of property = Absent" as a TID 1501 qualitative evaluation
#: (not "Finding", which TID 1501 already uses for the finding type).
PRESENCE = CodedConcept("121052", "DCM", "Presence of property")
ABSENT = CodedConcept("121054", "DCM", "Absent")

#: TID 1500 row 12: report-level qualitative evaluations (free-text notes go here as TEXT).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = CodedConcept("121106", "DCM", "Comment")

#: Finding site of a lung nodule: Lung (CID 6102/7151) with its laterality (CID 244).
FINDING_SITE_LUNG = CodedConcept("39607008", "SCT", "Lung")
LEFT = CodedConcept("7771000", "SCT", "Left")
RIGHT = CodedConcept("24028007", "SCT", "Right")

#: Finding types of a lung nodule or mass (CID 6102 "Nodule", "Mass").
NODULE = CodedConcept("27925004", "SCT", "Nodule")
MASS = CodedConcept("4147007", "SCT", "Mass")

#: Fallback Procedure Reported (CID 100).
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# Procedure Reported by modality: the CID 100 LOINC "unspecified body region" entries.
_BY_MODALITY: dict[str, CodedConcept] = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": CodedConcept("49118-3", "LN", "NM unspecified body region"),
    "CR": CodedConcept("43468-8", "LN", "XR unspecified body region"),
    "DX": CodedConcept("43468-8", "LN", "XR unspecified body region"),
}

# More specific procedures where the body part is known (SNOMED CT procedure concepts).
_BY_MODALITY_AND_BODY_PART: dict[tuple[str, str], CodedConcept] = {
    ("CT", "CHEST"): CodedConcept("169069000", "SCT", "Computed tomography of chest"),
}


def coded(code: Code) -> CodedConcept:
    """Turn an ``inference`` code into a highdicom coded concept."""
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def procedure_reported(modality: str, body_part: str | None) -> CodedConcept:
    """The imaging procedure the report is about, from the source Modality and BodyPartExamined."""
    key = (modality.strip().upper(), (body_part or "").strip().upper())
    if key in _BY_MODALITY_AND_BODY_PART:
        return _BY_MODALITY_AND_BODY_PART[key]
    return _BY_MODALITY.get(key[0], IMAGING_PROCEDURE)
