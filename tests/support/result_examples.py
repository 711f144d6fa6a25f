"""Hand-made predictions from the chest phantom's ground truth (tests, benchmarks, docs).

Builds what a model would return (regions ``lungs`` and ``body``, one lesion per nodule) without
running a model, so the encoders can be checked against known masks.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.demo import Phantom, SeriesInfo, slice_datasets
from inference.prediction import (
    ANATOMICAL_STRUCTURE,
    DIAMETER,
    ENTIRE_BODY,
    HU,
    LUNG,
    MEAN,
    ML,
    MM,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    SCT,
    VOLUME,
    Code,
    Label,
    Measurement,
    Prediction,
    Segment,
    SegmentKind,
)
from inference.volume import Volume

LUNG_LABEL = Label(
    "Lungs", ANATOMICAL_STRUCTURE, LUNG, color=(128, 174, 128)
)
BODY_LABEL = Label(
    "Body", ANATOMICAL_STRUCTURE, ENTIRE_BODY, color=(177, 122, 101)
)
NODULE_LABEL = Label(
    "Nodule",
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    Code("27925004", SCT, "Nodule"),
    kind=SegmentKind.LESION,
    color=(255, 0, 0),
)


def volume_of(phantom: Phantom, modality: str = "CT") -> Volume:
    """The phantom as the loader would hand it to a model."""
    return Volume(array=phantom.hu, affine=phantom.affine, modality=modality)


def _region(label: Label, mask: np.ndarray, volume: Volume) -> Segment:
    ml = float(mask.sum()) * volume.voxel_volume_ml
    mean = float(volume.array[mask].mean()) if mask.any() else 0.0
    return Segment(
        label=label,
        mask=mask,
        measurements=[Measurement(VOLUME, round(ml, 3), ML), Measurement(MEAN, round(mean, 2), HU)],
    )


def circle_outline(
    volume: Volume, key_slice: int, centre: np.ndarray, radius_mm: float, n: int = 32
) -> np.ndarray:
    """A closed polygon ``(n + 1, 3)`` in LPS mm on slice ``key_slice`` around ``centre``."""
    row_dir = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
    col_dir = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    on_slice = volume.index_to_patient(np.array([key_slice, 0.0, 0.0]))
    normal = np.cross(col_dir, row_dir)
    # Project the centre onto the key slice's plane.
    c = centre - np.dot(centre - on_slice, normal) / np.dot(normal, normal) * normal
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    pts = c + radius_mm * (np.cos(t)[:, None] * col_dir + np.sin(t)[:, None] * row_dir)
    return np.vstack([pts, pts[:1]])


def _lesion(
    index: int,
    mask: np.ndarray,
    centre: tuple[float, float, float],
    diameter: float,
    volume: Volume,
    confidence: float,
) -> Segment:
    area = mask.sum(axis=(1, 2))
    key = int(np.argmax(area))
    c = np.asarray(centre, dtype=np.float64)
    dz = float(
        np.dot(
            volume.index_to_patient(np.array([key, 0.0, 0.0])) - c,
            volume.affine[:3, 0] / np.linalg.norm(volume.affine[:3, 0]),
        )
    )
    radius = float(np.sqrt(max((diameter / 2.0) ** 2 - dz**2, 1.0)))
    ml = float(mask.sum()) * volume.voxel_volume_ml
    return Segment(
        label=NODULE_LABEL,
        mask=mask,
        measurements=[Measurement(VOLUME, round(ml, 4), ML), Measurement(DIAMETER, diameter, MM)],
        tracking_id=f"Nodule {index + 1}",
        confidence=confidence,
        centre=(float(c[0]), float(c[1]), float(c[2])),
        key_slice=key,
        outline=circle_outline(volume, key, c, radius),
    )


def phantom_prediction(
    phantom: Phantom,
    *,
    model_name: str = "ct-tissue",
    model_version: str = "1.0.0",
    regions: tuple[str, ...] = ("lungs", "body"),
    notes: tuple[str, ...] = (),
) -> Prediction:
    """A prediction equal to the phantom's truth: the given regions plus each nodule as a lesion."""
    volume = volume_of(phantom)
    labels = {"lungs": LUNG_LABEL, "body": BODY_LABEL}
    segments = [
        _region(labels[name], np.ascontiguousarray(phantom.masks[name]), volume) for name in regions
    ]
    for i, nodule in enumerate(phantom.nodules):
        segments.append(
            _lesion(
                i,
                phantom.masks[f"nodule_{i}"],
                nodule.centre,
                nodule.diameter_mm,
                volume,
                confidence=0.9 - 0.1 * i,
            )
        )
    return Prediction(
        model_name=model_name, model_version=model_version, segments=segments, notes=list(notes)
    )


#: Fixed identities for example series (tests compare runs, so nothing here may be random).
EXAMPLE_STUDY_UID = "2.25.101851932186425381234125823452211970001"
EXAMPLE_FRAME_OF_REFERENCE_UID = "2.25.101851932186425381234125823452211970003"


def example_series_info(modality: str = "CT", **changes: object) -> SeriesInfo:
    """A :class:`SeriesInfo` with fixed study, series and frame-of-reference UIDs."""
    series_uid = "2.25.10185193218642538123412582345221197" + (
        "1002" if modality == "CT" else "2002"
    )
    fields: dict[str, object] = {
        "modality": modality,
        "study_uid": EXAMPLE_STUDY_UID,
        "series_uid": series_uid,
        "frame_of_reference_uid": EXAMPLE_FRAME_OF_REFERENCE_UID,
        **changes,
    }
    return SeriesInfo(**fields)  # type: ignore[arg-type]


def single_frame_sources(
    phantom: Phantom, info: SeriesInfo | None = None
) -> tuple[list[Dataset], list[tuple[int, int]]]:
    """The phantom as single-frame images and the loader's ``frame_refs`` (slice k -> image k)."""
    sources = slice_datasets(phantom.hu, phantom.affine, info or example_series_info())
    return sources, [(k, 1) for k in range(len(sources))]


def enhanced_sources(
    phantom: Phantom, info: SeriesInfo | None = None
) -> tuple[list[Dataset], list[tuple[int, int]]]:
    """The phantom as one Legacy Converted Enhanced CT image and ``frame_refs`` into its frames."""
    singles = slice_datasets(phantom.hu, phantom.affine, info or example_series_info())
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=singles,
        series_instance_uid=str(singles[0].SeriesInstanceUID)[:-1] + "9",
        series_number=3,
        sop_instance_uid=str(singles[0].SOPInstanceUID)[:-1] + "9",
        instance_number=1,
    )
    # The converter orders frames its own way: find each slice's frame by its position.
    positions = [
        tuple(np.round(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 3))
        for item in enhanced.PerFrameFunctionalGroupsSequence
    ]
    frame_of = {p: f + 1 for f, p in enumerate(positions)}
    refs = [
        (0, frame_of[tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3))])
        for ds in singles
    ]
    return [enhanced], refs
