"""DICOM Segmentation (SEG) of a prediction, pixel-aligned with its source frames (highdicom)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import highdicom as hd
import numpy as np

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


def segments_overlap(stack: np.ndarray) -> bool:
    """True when two segments of a ``(frames, rows, columns, segments)`` stack share a pixel."""
    # Summing along the short last axis (what highdicom does) runs at ~30 M px/s and makes an
    # int64 copy of the whole stack (1 GB for 500x512x512); strided adds over a few frames at
    # a time are ~20x faster and need a few MB.
    step = 16
    for start in range(0, stack.shape[0], step):
        chunk = stack[start : start + step]
        total = chunk[..., 0].astype(np.uint8)
        for i in range(1, stack.shape[-1]):
            total += chunk[..., i]
        if int(total.max(initial=0)) > 1:
            return True
    return False


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a faster, leaner overlap check for binary stacks."""

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls,
        pixel_array: np.ndarray,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray, hd.seg.SegmentsOverlapValues]:
        if (
            isinstance(pixel_array, np.ndarray)
            and pixel_array.ndim == 4
            and pixel_array.dtype == np.bool_
            and pixel_array.shape[-1] > 1
            and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
            and len(segment_numbers) == pixel_array.shape[-1]
        ):
            overlap = segments_overlap(pixel_array)
            return pixel_array, (
                hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO
            )
        array, overlap_value = super()._check_and_cast_pixel_array(
            pixel_array, segment_numbers, segmentation_type, dtype
        )
        return np.asarray(array), overlap_value


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
    colors = display_colors(segments)
    descriptions = [
        segment_description(n, s, prediction, uids, color)
        for n, (s, color) in enumerate(zip(segments, colors, strict=True), start=1)
    ]
    seg = _Segmentation(
        source_images=frames.images,
        pixel_array=_pixel_array(segments, frames, labelmap),
        segmentation_type=seg_type,
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series,
        series_number=options.seg_series_number,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=lo(options.manufacturer),
        manufacturer_model_name=lo(prediction.model_name),
        software_versions=lo(options.software_version),
        device_serial_number=uids.device,
        transfer_syntax_uid=options.seg_transfer_syntax,
        omit_empty_frames=True,
        content_label="AI_RESULT",
        content_description=lo(f"{prediction.model_name} {prediction.model_version}"),
        series_description=series_description("SEG", prediction),
        contributing_equipment=[contributing_equipment(prediction, options, uids.device)],
    )
    # General Equipment: the model is the device; its UID changes with the model version.
    seg.DeviceUID = uids.device
    fill_type2(seg)
    return seg
