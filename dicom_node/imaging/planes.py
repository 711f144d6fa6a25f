"""The 2D images of a series as the loader sees them: one :class:`Plane` per single-frame
instance or per frame of an enhanced multi-frame instance, read from the header (position,
orientation, spacing, rescale, what tells apart images at one position).  Geometry checks and
stacking happen in :mod:`dicom_node.imaging.loading`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.imaging.errors import SeriesError

#: What tells apart images at the same position, tried in this order: (what, single-frame
#: attribute, enhanced multi-frame attribute of the per-frame functional groups).
SPLIT_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("echo", "EchoNumbers", "EffectiveEchoTime"),
    ("acquisition", "AcquisitionNumber", "FrameAcquisitionNumber"),
    ("time point", "TemporalPositionIdentifier", "TemporalPositionIndex"),
)


@dataclass(frozen=True)
class Plane:
    """One 2D image (a single-frame instance or one frame of a multi-frame instance)."""

    source: int
    frame: int
    sop_instance_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    slice_thickness: float | None
    multiframe: bool
    #: (what, attribute keyword, value) for each entry of SPLIT_ATTRIBUTES present.
    split_keys: tuple[tuple[str, str, str], ...]

    @property
    def label(self) -> str:
        if self.multiframe:
            return f"{self.sop_instance_uid} frame {self.frame}"
        return self.sop_instance_uid

    def split_key(self, what: str) -> tuple[str, str] | None:
        """(attribute keyword, value) telling this image apart by ``what``, if present."""
        return next(((kw, v) for w, kw, v in self.split_keys if w == what), None)


def _floats(value: Any, count: int, what: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in (value if isinstance(value, Sequence) and
                                       not isinstance(value, str) else [value]))
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where} has an unreadable {what} {value!r}") from exc
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise SeriesError(f"{where} has {what} {list(out)}, expected {count} finite numbers")
    return out


def is_localizer(image_type: Any) -> bool:
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).upper() == "LOCALIZER" for v in values)


def _first_item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None or keyword not in seq_owner:
        return None
    seq = seq_owner[keyword].value
    return seq[0] if seq else None


def single_plane(index: int, ds: Dataset, sop: str) -> Plane:
    where = f"image {sop}"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(keyword) is None:
            raise SeriesError(f"{where} has no {keyword}: its place in the volume is unknown")
    keys = tuple((what, kw, str(ds.get(kw))) for what, kw, _ in SPLIT_ATTRIBUTES
                 if ds.get(kw) not in (None, ""))
    thickness = ds.get("SliceThickness")
    return Plane(
        source=index,
        frame=1,
        sop_instance_uid=sop,
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        multiframe=False,
        split_keys=keys,
    )


def enhanced_planes(index: int, ds: Dataset, excluded: list[tuple[str, str]]) -> list[Plane]:
    sop = str(ds.SOPInstanceUID)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.PerFrameFunctionalGroupsSequence
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != frames:
        raise SeriesError(f"image {sop} has {frames} frames but {len(per_frame)} per-frame "
                          "functional group items")

    def group(item: Dataset, keyword: str) -> Dataset | None:
        # A functional group lives in the per-frame item or, when common, in the shared one.
        return _first_item(item, keyword) or _first_item(shared, keyword)

    out = []
    for n, item in enumerate(per_frame, start=1):
        where = f"frame {n} of image {sop}"
        frame_type = (group(item, "CTImageFrameTypeSequence")
                      or group(item, "MRImageFrameTypeSequence"))
        if is_localizer(frame_type.get("FrameType") if frame_type is not None else None):
            excluded.append((sop, f"frame {n}: localizer (FrameType contains LOCALIZER)"))
            continue
        position = group(item, "PlanePositionSequence")
        orientation = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        if position is None or position.get("ImagePositionPatient") is None:
            raise SeriesError(f"{where} has no ImagePositionPatient: its place in the volume is "
                              "unknown")
        if orientation is None or orientation.get("ImageOrientationPatient") is None:
            raise SeriesError(f"{where} has no ImageOrientationPatient: its place in the volume "
                              "is unknown")
        if measures is None or measures.get("PixelSpacing") is None:
            raise SeriesError(f"{where} has no PixelSpacing")
        transform = group(item, "PixelValueTransformationSequence")
        content = group(item, "FrameContentSequence")
        echo = group(item, "MREchoSequence")
        keys: list[tuple[str, str, str]] = []
        for what, _, keyword in SPLIT_ATTRIBUTES:
            owner = echo if keyword == "EffectiveEchoTime" else content
            if owner is not None and owner.get(keyword) not in (None, ""):
                keys.append((what, keyword, str(owner.get(keyword))))
        thickness = measures.get("SliceThickness")
        out.append(Plane(
            source=index,
            frame=n,
            sop_instance_uid=sop,
            position=_floats(position.ImagePositionPatient, 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
            orientation=_floats(orientation.ImageOrientationPatient, 6,  # type: ignore[arg-type]
                                "ImageOrientationPatient", where),
            pixel_spacing=_floats(measures.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            slope=float(transform.get("RescaleSlope", 1.0) or 1.0) if transform else 1.0,
            intercept=float(transform.get("RescaleIntercept", 0.0) or 0.0) if transform else 0.0,
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            multiframe=True,
            split_keys=tuple(keys),
        ))
    return out
