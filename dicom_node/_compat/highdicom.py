"""highdicom, patched: every private name of highdicom the node relies on is here.

``Segmentation._check_and_cast_pixel_array`` (a classmethod of ``(pixel_array,
segment_numbers, segmentation_type, dtype)``) is overridden for binary stacks: highdicom sums
along the short segment axis, which makes an int64 copy of the whole stack and runs at ~30 M
pixels/s; :func:`segments_overlap` adds a few frames at a time, ~20x faster in a few MB.
``tests/unit/test_compat.py`` fails when the name or its shape changes.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np


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


class Segmentation(hd.seg.Segmentation):
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
