"""DICOM Segmentation (SEG) of a prediction, pixel-aligned with its source frames (highdicom)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node._compat.highdicom import Segmentation
from dicom_node.results import codes
from dicom_node.results.common import (
    ResultEncodingError,
    ResultOptions,
    ResultUIDs,
    SourceFrames,
    contributing_equipment,
    fill_type2,
    lo,
    series_description,
)
from inference.prediction import Prediction, Segment


def algorithm_identification(prediction: Prediction) -> hd.AlgorithmIdentificationSequence:
    """The model as the segment algorithm (family: Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=lo(prediction.model_name),
        family=codes.ALGORITHM_FAMILY,
        version=lo(prediction.model_version),
    )


#: Fallback display colours (RGB), far apart in hue and lightness, for segments whose label has
#: no colour or whose label colour another segment already took (e.g. "Nodule 2").
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


def display_colors(segments: Sequence[Segment]) -> list[tuple[int, int, int]]:
    """One distinct RGB colour per segment, in order.

    A segment gets its label's colour unless an earlier segment already has it; otherwise the
    first palette colour not yet used (after the palette runs out, colours are spread evenly
    over the hue circle).
    """
    used: set[tuple[int, int, int]] = set()
    out: list[tuple[int, int, int]] = []
    spare = iter(PALETTE)
    for i, segment in enumerate(segments):
        rgb = tuple(segment.label.color) if segment.label.color is not None else None
        if rgb is None or rgb in used:
            rgb = next((c for c in spare if c not in used), None)
        while rgb is None or rgb in used:
            r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.9)
            rgb = (round(255 * r), round(255 * g), round(255 * b))
            i += 1
        color = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
        used.add(color)
        out.append(color)
    return out


def segment_description(
    number: int,
    segment: Segment,
    prediction: Prediction,
    uids: ResultUIDs,
    color: tuple[int, int, int] | None = None,
) -> hd.seg.SegmentDescription:
    """One AUTOMATIC segment labelled with its tracking id (e.g. "Nodule 2"), coded category and
    type, its tracking identifiers and a recommended display colour (CIELab)."""
    label = segment.label
    rgb = color if color is not None else label.color
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=lo(segment.tracking_id),
        segmented_property_category=codes.coded(label.category),
        segmented_property_type=codes.coded(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(prediction),
        tracking_uid=uids.tracking(segment.tracking_id),
        tracking_id=lo(segment.tracking_id),
        display_color=hd.color.CIELabColor.from_rgb(*rgb) if rgb is not None else None,
    )


def _pixel_array(segments: Sequence[Segment], frames: SourceFrames, labelmap: bool) -> np.ndarray:
    first = segments[0].mask
    plane = first.shape[1:]
    if labelmap:
        # One plane per frame holding segment numbers: overlapping segments cannot be told apart.
        out = np.zeros(
            (frames.n_frames, *plane), dtype=np.uint8 if len(segments) < 256 else np.uint16
        )
        for number, seg in enumerate(segments, start=1):
            target = out[frames.frame_of_slice]
            if np.any(target[seg.mask] != 0):
                raise ResultEncodingError(
                    f"segment {seg.label.name!r} overlaps another: LABELMAP needs disjoint segments"
                )
            target[seg.mask] = number
            out[frames.frame_of_slice] = target
        return out
    # Segment-major storage, handed over as a (frames, rows, columns, segments) view: every
    # plane highdicom takes out of it (``[frame][:, :, segment]``) is then contiguous memory.
    stack = np.zeros((len(segments), frames.n_frames, *plane), dtype=np.bool_)
    for i, seg in enumerate(segments):
        stack[i, frames.frame_of_slice] = seg.mask
    return np.moveaxis(stack, 0, -1)


# --- geometry -----------------------------------------------------------------------------
# highdicom (0.28) reads the source's geometry at fixed places whatever is passed to it:
# PixelMeasuresSequence and PlaneOrientationSequence in the *shared* functional groups of a
# multi-frame source (the standard also allows them per frame, as Siemens XA enhanced MR has
# them), SliceThickness at the top level of a single-frame one.  The source handed to it is a
# shallow copy holding them there; the same values go in explicitly, and the volume's slice
# spacing is written into the SEG for readers that build a volume from it (dcmqi).

_GEOMETRY_GROUPS = ("PixelMeasuresSequence", "PlaneOrientationSequence")


def _group_item(image: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The ``keyword`` functional group of 0-based ``frame``: per-frame, else shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = image.get(groups)
        if items is not None and len(items) > index and keyword in items[index]:
            sequence = items[index][keyword].value
            if len(sequence) == 1:
                return sequence[0]  # type: ignore[no-any-return]
    return None


def _frame_geometry(image: Dataset, frames: Sequence[int]) -> dict[str, Dataset]:
    """The Pixel Measures and Plane Orientation items the ``frames`` (0-based) share.

    Raises ResultEncodingError naming the functional group when a frame lacks one or the
    frames disagree (a SEG has one orientation and one pixel spacing).
    """
    out: dict[str, Dataset] = {}
    for keyword in _GEOMETRY_GROUPS:
        first: Dataset | None = None
        for frame in frames:
            item = _group_item(image, frame, keyword)
            if item is None:
                raise ResultEncodingError(
                    f"frame {frame + 1} of the source image has no {keyword} in its shared or "
                    "per-frame functional groups"
                )
            if first is None:
                first = item
            elif not _same_geometry(item, first):
                raise ResultEncodingError(
                    f"the source frames differ in {keyword}: a SEG needs one for all frames"
                )
        assert first is not None  # frames is never empty
        out[keyword] = first
    return out


def _same_geometry(a: Dataset, b: Dataset) -> bool:
    for keyword in ("PixelSpacing", "ImageOrientationPatient"):
        if (keyword in a) != (keyword in b):
            return False
        if keyword in a and not np.allclose(
            np.asarray(a[keyword].value, dtype=np.float64),
            np.asarray(b[keyword].value, dtype=np.float64),
            atol=1e-4,
        ):
            return False
    return True


def geometry_sources(frames: SourceFrames) -> tuple[list[Dataset], dict[str, object]]:
    """The source images as highdicom reads their geometry, and the explicit geometry arguments.

    For every functional-group layout of a multi-frame source (shared, per-frame, mixed) the
    returned copy carries the Pixel Measures and Plane Orientation of the frames the volume uses
    in its shared functional groups; single-frame sources without SliceThickness get it empty.
    Only shallow copies are made: the caller's datasets and their pixel data are untouched.
    """
    images = list(frames.images)
    first = images[0]
    if frames.multiframe:
        used = sorted({int(f) for f in frames.frame_of_slice})
        groups = _frame_geometry(first, used)
        copy = Dataset(first)
        shared = Dataset(copy.SharedFunctionalGroupsSequence[0]) if (
            "SharedFunctionalGroupsSequence" in copy
            and len(copy.SharedFunctionalGroupsSequence) == 1
        ) else Dataset()
        for keyword, item in groups.items():
            setattr(shared, keyword, [item])
        copy.SharedFunctionalGroupsSequence = [shared]
        measures = groups["PixelMeasuresSequence"]
        orientation = groups["PlaneOrientationSequence"]
        for keyword, owner in (("PixelSpacing", measures), ("ImageOrientationPatient", orientation)):
            if keyword not in owner:
                group = "PixelMeasuresSequence" if owner is measures else "PlaneOrientationSequence"
                raise ResultEncodingError(f"the source's {group} has no {keyword}")
        thickness = measures.get("SliceThickness")
        images = [copy]
    else:
        for keyword in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"):
            if keyword not in first:
                raise ResultEncodingError(f"the source image has no {keyword}")
        if "SliceThickness" not in first:
            copy = Dataset(first)
            copy.SliceThickness = None
            images[0] = copy
        # highdicom wants every ImageOrientationPatient equal to the first's, value for value;
        # scanners round them differently from slice to slice (the loader allows 1e-4).
        iop = first.ImageOrientationPatient
        for k, image in enumerate(images):
            if image.get("ImageOrientationPatient") != iop:
                if not np.allclose(np.asarray(image.ImageOrientationPatient, np.float64),
                                   np.asarray(iop, np.float64), atol=1e-4):
                    raise ResultEncodingError(
                        "the source images differ in ImageOrientationPatient: a SEG needs one "
                        "orientation for all frames"
                    )
                copy = Dataset(image)
                copy.ImageOrientationPatient = iop
                images[k] = copy
        measures, orientation = first, first
        thickness = first.get("SliceThickness")
    explicit: dict[str, object] = {
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=[float(v) for v in measures.PixelSpacing],
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
        ),
        "plane_orientation": hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            image_orientation=[float(v) for v in orientation.ImageOrientationPatient],
        ),
    }
    return images, explicit


def slice_spacing(frames: SourceFrames, orientation: Sequence[float]) -> float | None:
    """Distance between neighbouring slices along the normal when the slices are regular (mm).

    None for one slice or unequal spacing (a series of several stacks): the SEG then states no
    SpacingBetweenSlices.
    """
    if len(frames.frame_of_slice) < 2:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    distances = []
    for k in range(len(frames.frame_of_slice)):
        image, frame = frames.image_of_slice(k)
        if frame is None:
            position = image.ImagePositionPatient
        else:
            item = _group_item(image, frame - 1, "PlanePositionSequence")
            if item is None or "ImagePositionPatient" not in item:
                raise ResultEncodingError(
                    f"frame {frame} of the source image has no PlanePositionSequence with an "
                    "ImagePositionPatient"
                )
            position = item.ImagePositionPatient
        distances.append(float(np.dot(np.asarray(position, dtype=np.float64), normal)))
    steps = np.abs(np.diff(np.sort(distances)))
    step = float(steps.mean())
    # DS values carry ~6 significant digits: a regular stack agrees far better than this.
    if step <= 0.0 or float(np.abs(steps - step).max()) > max(0.01, 0.01 * step):
        return None
    return step


def encode_seg(
    prediction: Prediction,
    segments: Sequence[Segment],
    frames: SourceFrames,
    uids: ResultUIDs,
    options: ResultOptions,
) -> hd.seg.Segmentation:
    """Encode ``segments`` (non-empty masks, numbered 1.. in order) as one SEG instance."""
    if not segments:
        raise ResultEncodingError("a SEG needs at least one non-empty segment")
    seg_type = hd.seg.SegmentationTypeValues(options.segmentation_type.upper())
    labelmap = seg_type == hd.seg.SegmentationTypeValues.LABELMAP
    images, geometry = geometry_sources(frames)
    seg = Segmentation(
        source_images=images,
        pixel_array=_pixel_array(segments, frames, labelmap),
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(segments, prediction, uids),
        series_instance_uid=uids.seg_series,
        series_number=options.seg_series_number,
        sop_instance_uid=uids.seg_instance,
        **seg_attributes(prediction, options, uids.device),
        **geometry,  # type: ignore[arg-type]
    )
    spacing = slice_spacing(frames, geometry["plane_orientation"][0].ImageOrientationPatient)  # type: ignore[index]
    if spacing is not None:
        # Readers that rebuild a volume (dcmqi) take the slice step from here, else from
        # SliceThickness, which differs from it for overlapping or tilted slices.
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        measures.SpacingBetweenSlices = f"{spacing:.6g}"
    # General Equipment: the model is the device; its UID changes with the model version.
    seg.DeviceUID = uids.device
    fill_type2(seg)
    return seg


def segment_descriptions(
    segments: Sequence[Segment], prediction: Prediction, uids: ResultUIDs
) -> list[hd.seg.SegmentDescription]:
    """The segments numbered 1.. in order, each with its display colour."""
    colors = display_colors(segments)
    return [segment_description(n, s, prediction, uids, color)
            for n, (s, color) in enumerate(zip(segments, colors, strict=True), start=1)]


def seg_attributes(prediction: Prediction, options: ResultOptions, device: str, *,
                   suffix: str = "") -> dict[str, Any]:
    """What every SEG the node writes says of itself: equipment, encoding, content and series
    description (``suffix`` tells a variant apart, e.g. " orthogonal")."""
    return {
        "instance_number": 1,
        "manufacturer": lo(options.manufacturer),
        "manufacturer_model_name": lo(prediction.model_name),
        "software_versions": lo(options.software_version),
        "device_serial_number": device,
        "transfer_syntax_uid": options.seg_transfer_syntax,
        "omit_empty_frames": True,
        "content_label": "AI_RESULT",
        "content_description": lo(f"{prediction.model_name} {prediction.model_version}{suffix}"),
        "series_description": lo(series_description("SEG", prediction) + suffix),
        "contributing_equipment": [contributing_equipment(prediction, options, device)],
    }
