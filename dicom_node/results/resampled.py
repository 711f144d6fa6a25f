"""The ``seg-resampled`` output: a second SEG of a gantry-tilted stack on an orthogonal grid.

The ``seg`` output keeps every frame on its (sheared) source frame, which viewers that place
frames by their source references or positions (OHIF, highdicom) show exactly.  Readers that
rebuild a volume from the SEG's own plane positions cannot: dcmqi (``segimage2itkimage``, so
3D Slicer's QuantitativeReporting) builds an ITK image whose axes are row, column and
row x column, puts its origin at the frame lowest along that normal and places every frame
by rounding its Image Position to a voxel index, keeping only the slice index.  On a tilted
stack frame ``k`` lies ``k * step * sin(tilt)`` mm off that grid in the plane: dcmqi writes
no volume once the offset rounds to a negative pixel ("Frame 0 origin ... is outside image
geometry"), and misplaces every slice by it without a word when it is positive.

This SEG is what such readers can hold: the same planes as the source (same orientation,
pixel spacing and position along the normal, so no interpolation across slices), each moved
within its plane so that the frame origins lie on one line along the normal.  A source voxel
lands on the target voxel nearest to it: plane ``k`` moves by ``k * step * sin(tilt)`` mm,
rounded to whole pixels, so every voxel is kept (the same count) and none is more than half a
pixel in-plane from where it was; the grid grows by the shear (rows, columns, or both).  Its
frames reference the coplanar source frames with Spatial Locations Preserved NO, and it keeps
the source's Frame of Reference (the patient coordinates are the same).

An untilted stack gives no such SEG: the ``seg`` output already is on an orthogonal grid.
A series of several regular stacks of different spacing gives none either (no single slice
step to put the grid on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node._compat.highdicom import Segmentation
from dicom_node.results.common import (
    ResultEncodingError,
    ResultOptions,
    ResultUIDs,
    SourceFrames,
    fill_type2,
)
from dicom_node.results.context import EncodeContext
from dicom_node.results.seg import geometry_sources, seg_attributes, segment_descriptions
from inference.prediction import Prediction, Segment
from inference.stacks import StackedVolume
from inference.volume import Volume

#: The output type's name (registry, destination ``outputs``, UIDs, Series Number offset).
KIND = "seg-resampled"

#: Shear below this many pixels over the whole stack is rounding, not tilt: no second SEG.
SHEAR_TOLERANCE_PX = 0.05


@dataclass(frozen=True)
class OrthogonalGrid:
    """Where each slice of a sheared volume goes on the orthogonal grid of its planes.

    ``shift[k]`` = (rows, columns) slice ``k`` moves by, whole pixels, all >= 0;
    ``shape`` = (slices, rows, columns) of the grid; ``positions[k]`` = the patient position
    (mm) of grid voxel ``(k, 0, 0)``, on a line along the plane normal; ``step`` = distance
    between neighbouring planes along the normal (mm).
    """

    shift: np.ndarray
    shape: tuple[int, int, int]
    positions: np.ndarray
    step: float


def orthogonal_grid(volume: Volume) -> OrthogonalGrid | None:
    """The orthogonal grid of ``volume``'s planes; None when the volume is not sheared (or has
    several stacks, or one slice)."""
    if isinstance(volume, StackedVolume) or volume.shape[0] < 2:
        return None
    affine = np.asarray(volume.affine, dtype=np.float64)
    slice_step, row_step, col_step = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    dr, dc = float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))
    ur, uc = row_step / dr, col_step / dc
    normal = np.cross(uc, ur)  # DICOM: row direction (columns axis) x column direction
    normal /= np.linalg.norm(normal)
    # Shear per slice in pixels along the rows (index 1) and the columns (index 2) axis.
    per_slice = np.array([float(slice_step @ ur) / dr, float(slice_step @ uc) / dc])
    k = np.arange(volume.shape[0], dtype=np.float64)[:, None]
    exact = k * per_slice  # (slices, 2)
    if float(np.abs(exact[-1]).max()) < SHEAR_TOLERANCE_PX:
        return None
    low = exact.min(axis=0)
    exact -= low  # >= 0: the grid starts at the lowest-shifted plane's edge
    shift = np.rint(exact).astype(np.int64)
    rows, cols = volume.shape[1:]
    shape = (volume.shape[0], rows + int(shift[:, 0].max()), cols + int(shift[:, 1].max()))
    # Grid voxel (k, 0, 0) is source continuous index (k, -exact_r, -exact_c): its positions
    # differ from slice to slice only along the normal.
    origin = affine[:3, 3]
    positions = origin + k * slice_step - exact[:, :1] * row_step - exact[:, 1:] * col_step
    step = abs(float(slice_step @ normal))
    return OrthogonalGrid(shift, shape, positions, step)


def resample_masks(segments: Sequence[Segment], grid: OrthogonalGrid) -> np.ndarray:
    """``(slices, rows, columns, segments)`` boolean stack of the masks moved onto ``grid``."""
    _, rows, cols = segments[0].mask.shape
    out = np.zeros((*grid.shape, len(segments)), dtype=np.bool_)
    for s, segment in enumerate(segments):
        for k in range(grid.shape[0]):
            dr, dc = (int(v) for v in grid.shift[k])
            out[k, dr : dr + rows, dc : dc + cols, s] = segment.mask[k]
    return out


def encode_resampled_seg(
    prediction: Prediction,
    segments: Sequence[Segment],
    volume: Volume,
    frames: SourceFrames,
    uids: ResultUIDs,
    options: ResultOptions,
) -> hd.seg.Segmentation | None:
    """The SEG of ``segments`` on the orthogonal grid of ``volume``'s planes (None unsheared)."""
    if not segments:
        raise ResultEncodingError("a SEG needs at least one non-empty segment")
    grid = orthogonal_grid(volume)
    if grid is None:
        return None
    seg_type = hd.seg.SegmentationTypeValues(options.segmentation_type.upper())
    stack = resample_masks(segments, grid)
    if seg_type == hd.seg.SegmentationTypeValues.LABELMAP:
        if int(stack.sum(axis=-1, dtype=np.uint16).max(initial=0)) > 1:
            raise ResultEncodingError("segments overlap: LABELMAP needs disjoint segments")
        labels = np.zeros(grid.shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
        for number in range(1, len(segments) + 1):
            labels[stack[..., number - 1]] = number
        pixel_array: np.ndarray = labels
    else:
        pixel_array = stack
    images, geometry = geometry_sources(frames)
    thickness = geometry["pixel_measures"][0].get("SliceThickness")  # type: ignore[index]
    seg = Segmentation(
        source_images=images,
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(segments, prediction, uids),
        series_instance_uid=uids.series(KIND),
        series_number=options.series_number(KIND),
        sop_instance_uid=uids.instance(KIND),
        **seg_attributes(prediction, options, uids.device, suffix=" orthogonal"),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[float(v) for v in geometry["pixel_measures"][0].PixelSpacing],  # type: ignore[index]
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            spacing_between_slices=grid.step,
        ),
        plane_orientation=geometry["plane_orientation"],  # type: ignore[arg-type]
        plane_positions=[
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in p])
            for p in grid.positions
        ],
    )
    seg.DeviceUID = uids.device
    fill_type2(seg)
    return seg


def encode(ctx: EncodeContext) -> list[Dataset]:
    """The ``seg-resampled`` output: one SEG for a sheared stack with voxels, else none."""
    segments = ctx.segments_with_voxels
    if not segments:
        return []
    seg = encode_resampled_seg(ctx.prediction, segments, ctx.volume, ctx.frames, ctx.uids, ctx.options)
    return [] if seg is None else [seg]
