"""What the image-based results (GSPS, secondary capture, KOS) draw and say about a prediction.

Everything here works in the pixel space of a volume slice: ``(column, row)`` with 0.0 at the
top-left corner of the first pixel, as SCOORD and GSPS PIXEL units put it (pixel centres at
+0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from skimage import measure

from inference.prediction import DIAMETER, VOLUME, Prediction, Segment, SegmentKind
from inference.volume import Volume

#: Slices of a region segment drawn (where it is largest, and at a quarter and three quarters
#: of its extent): enough to show it without a presentation state of hundreds of polylines.
REGION_SLICES = 3
#: Tolerance (pixels) of the polygon simplification of a contour.
CONTOUR_TOLERANCE = 0.5


@dataclass(frozen=True)
class Window:
    """A VOI window (centre, width) in the units after the modality LUT, and why it was chosen."""

    center: float
    width: float
    explanation: str


#: CT windows (Hounsfield units).
LUNG_WINDOW = Window(-600.0, 1500.0, "LUNG")
SOFT_TISSUE_WINDOW = Window(40.0, 400.0, "SOFT TISSUE")

_LUNG_TYPES = {"39607008", "27925004", "786838002"}  # Lung, Nodule, Pulmonary nodule (SCT)


def is_finding(segment: Segment) -> bool:
    """A lesion with voxels: drawn with its outline, centre and measurements."""
    return segment.label.kind == SegmentKind.LESION and bool(segment.mask.any())


def key_slice(segment: Segment) -> int:
    """The slice that best shows ``segment``: the model's key slice, else its largest section."""
    if segment.key_slice is not None:
        return int(segment.key_slice)
    return int(np.argmax(segment.mask.sum(axis=(1, 2))))


def region_slices(segment: Segment) -> list[int]:
    """Representative slices of a region: its largest section and the quartiles of its extent."""
    area = segment.mask.sum(axis=(1, 2))
    present = np.flatnonzero(area)
    if present.size == 0:
        return []
    first, last = int(present[0]), int(present[-1])
    picks = [int(np.argmax(area))]
    for q in (0.25, 0.75):
        k = round(first + q * (last - first))
        if area[k] > 0:
            picks.append(k)
    return sorted(set(picks))[:REGION_SLICES]


def _measurement(segment: Segment, code_value: str) -> float | None:
    for m in segment.measurements:
        if m.name.value == code_value:
            return float(m.value)
    return None


def finding_text(segment: Segment) -> str:
    """E.g. ``"Nodule 1: 12.4 mm, 0.8 ml, confidence 71 %"`` (what the model measured)."""
    parts = []
    diameter = _measurement(segment, DIAMETER.value)
    if diameter is not None:
        parts.append(f"{diameter:.1f} mm")
    volume = _measurement(segment, VOLUME.value)
    if volume is not None:
        parts.append(f"{volume:.1f} ml" if volume >= 0.1 else f"{volume:.2f} ml")
    if segment.confidence is not None:
        parts.append(f"confidence {round(100 * segment.confidence)} %")
    return f"{segment.tracking_id}: {', '.join(parts)}" if parts else segment.tracking_id


def region_text(segment: Segment) -> str:
    """E.g. ``"Lungs: 4,210.5 ml"``."""
    volume = _measurement(segment, VOLUME.value)
    return f"{segment.tracking_id}: {volume:,.1f} ml" if volume is not None else segment.tracking_id


def summary_text(prediction: Prediction) -> str:
    """One sentence on what the model reported (KOS description, SC legend title)."""
    findings = [s for s in prediction.segments if is_finding(s)]
    regions = [s for s in prediction.segments if s.label.kind != SegmentKind.LESION and s.mask.any()]
    head = f"{prediction.model_name} {prediction.model_version}"
    if findings:
        return f"{head}: {len(findings)} finding(s): " + "; ".join(finding_text(s) for s in findings)
    if regions:
        return f"{head}: " + "; ".join(region_text(s) for s in regions)
    return f"{head}: no finding"


def contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed outlines ``(n, 2)`` (column, row) of a 2D mask, pixel edges, simplified."""
    padded = np.pad(mask2d.astype(np.float32), 1)
    out = []
    for found in measure.find_contours(padded, 0.5):  # type: ignore[no-untyped-call]
        c = measure.approximate_polygon(found, CONTOUR_TOLERANCE)  # type: ignore[no-untyped-call]
        if len(c) < 4:
            continue
        rows, cols = c[:, 0] - 1.0, c[:, 1] - 1.0
        xy = np.stack([cols + 0.5, rows + 0.5], axis=1)
        if not np.allclose(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        out.append(xy)
    return out


def outline_on_slice(segment: Segment, volume: Volume, k: int) -> list[np.ndarray]:
    """The finding's outline on slice ``k``: the model's outline when it lies there, else the
    contours of its mask."""
    if segment.outline is not None and segment.key_slice == k:
        index = volume.patient_to_index(np.asarray(segment.outline, dtype=np.float64))
        if float(np.abs(index[:, 0] - k).max()) <= 0.5:
            xy = np.stack([index[:, 2] + 0.5, index[:, 1] + 0.5], axis=1)
            if not np.allclose(xy[0], xy[-1]):
                xy = np.vstack([xy, xy[:1]])
            return [xy]
    return contours(segment.mask[k])


def centre_on_slice(segment: Segment, volume: Volume, k: int) -> np.ndarray:
    """The finding's centre ``(column, row)`` projected on slice ``k``."""
    if segment.centre is not None:
        index = volume.patient_to_index(np.asarray(segment.centre, dtype=np.float64))
        return np.array([index[2] + 0.5, index[1] + 0.5])
    rows, cols = np.nonzero(segment.mask[k])
    if rows.size == 0:
        rows, cols = np.nonzero(segment.mask.any(axis=0))
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def window_for(
    prediction: Prediction, modality: str, first: Dataset, pixels: Mapping[int, np.ndarray],
    slices: Sequence[int],
) -> Window:
    """The window the results are shown in: lung or soft tissue for CT (by what was found),
    the source's own window otherwise, else the 1st-99th percentile of the drawn slices."""
    if modality == "CT":
        lung = any(s.label.type.value in _LUNG_TYPES for s in prediction.segments)
        return LUNG_WINDOW if lung else SOFT_TISSUE_WINDOW
    center, width = first.get("WindowCenter"), first.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center)
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
        if w >= 1:
            return Window(c, w, "SOURCE")
    values = [np.asarray(pixels[k], dtype=np.float64).ravel() for k in slices if k in pixels]
    if not values:
        return Window(0.5, 1.0, "DEFAULT")
    lo, hi = np.percentile(np.concatenate(values), [1.0, 99.0])
    return Window(float((lo + hi) / 2.0), float(max(hi - lo, 1.0)), "AUTO 1-99 PERCENTILE")
