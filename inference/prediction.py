"""What a model returns: labelled masks with measurements, in the volume's voxel grid.

Nothing here knows DICOM; ``dicom_node.results`` turns a :class:`Prediction` into SEG + SR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


@dataclass(frozen=True)
class Code:
    """A coded concept (e.g. SNOMED CT ``("39607008", "SCT", "Lung")``)."""

    value: str
    scheme_designator: str
    meaning: str


# Codes used by several models and by the encoders.
SCT = "SCT"
UCUM = "UCUM"


class SegmentKind(str, Enum):
    """How a segment is reported: an anatomical region, or a lesion (a finding)."""

    REGION = "region"
    LESION = "lesion"


@dataclass(frozen=True)
class Label:
    """One output class of a model with its coded concepts (for the SEG and the SR)."""

    name: str
    category: Code
    type: Code
    kind: SegmentKind = SegmentKind.REGION
    #: Display colour hint (RGB 0-255) for viewers.
    color: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement with its concept and UCUM unit (e.g. volume in ml)."""

    name: Code
    value: float
    unit: Code


VOLUME = Code("118565006", SCT, "Volume")
DIAMETER = Code("81827009", SCT, "Diameter")
MEAN = Code("373098007", SCT, "Mean")

# Segmentation categories and types shared by several models (CID 7150 / 7151 / 7166, meanings
# as DICOM lists them).
ANATOMICAL_STRUCTURE = Code("91723000", SCT, "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", SCT, "Morphologically Abnormal Structure")
TISSUE = Code("85756007", SCT, "Tissue")
ENTIRE_BODY = Code("38266002", SCT, "Entire body")
LUNG = Code("39607008", SCT, "Lung")
ML = Code("ml", UCUM, "milliliter")
MM = Code("mm", UCUM, "millimeter")
HU = Code("[hnsf'U]", UCUM, "Hounsfield unit")


@dataclass
class Segment:
    """One labelled mask of a prediction.

    Parameters
    ----------
    label:
        What the segment is.
    mask:
        Boolean array with the shape of the volume.
    measurements:
        Measurements of the whole segment (volume, mean density, diameter...).
    tracking_id:
        Human-readable tracking identifier, unique within the prediction (e.g. ``"Nodule 1"``).
    confidence:
        Detection confidence in [0, 1], for lesions.
    centre:
        Centre in LPS mm, for lesions.
    key_slice:
        Index of the slice that best shows a lesion (its largest cross-section).
    outline:
        Closed polyline ``(n, 3)`` in LPS mm outlining the lesion on ``key_slice``.
    """

    label: Label
    mask: np.ndarray
    measurements: list[Measurement] = field(default_factory=list)
    tracking_id: str = ""
    confidence: float | None = None
    centre: tuple[float, float, float] | None = None
    key_slice: int | None = None
    outline: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mask.dtype != np.bool_:
            raise TypeError(f"Segment mask must be bool, got {self.mask.dtype} for {self.label.name!r}")
        if self.mask.ndim != 3:
            raise ValueError(f"Segment mask must be 3D, got shape {self.mask.shape} for {self.label.name!r}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence} for {self.label.name!r}")
        if not self.tracking_id:
            self.tracking_id = self.label.name


@dataclass
class Prediction:
    """Everything a model found in one volume.

    ``segments`` may be empty: the model ran and found nothing (the SR says so).
    """

    model_name: str
    model_version: str
    segments: list[Segment] = field(default_factory=list)
    #: Short free-text notes for the report (e.g. "no nodule >= 4 mm found").
    notes: list[str] = field(default_factory=list)
    #: SHA-256 (hex) of the weights that made the prediction; empty for models without weights.
    #: Part of the result's Device UID, so retrained weights are a different device.
    model_digest: str = ""
