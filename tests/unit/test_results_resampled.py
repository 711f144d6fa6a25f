"""The ``seg-resampled`` output: gantry-tilted stacks stay readable by dcmqi.

dcmqi (``segimage2itkimage``) rebuilds a volume on the orthogonal grid of the SEG's plane
orientation and places each frame by rounding its position to that grid: a SEG on the
sheared frames of a tilted stack gives no volume (tilt one way) or a misplaced one (the other
way).  The resampled SEG puts the same planes on an orthogonal grid; dcmqi then writes a
volume whose every voxel is a mask voxel of the source, at most half a pixel away in-plane.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.demo import ChestSpec, Phantom, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.imaging.loading import LoadedSeries, load_series
from dicom_node.results import ResultOptions, encode_outputs
from dicom_node.results.resampled import KIND, orthogonal_grid
from inference.prediction import Prediction, Segment
from inference.stacks import StackedVolume
from tests.conftest import require_tool
from tests.support import procs, quirks
from tests.support.result_examples import BODY_LABEL, NODULE_LABEL

TILT_DEG = 15.0


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """A 16-slice chest phantom (96 x 96, 3.5 mm pixels, 5 mm table steps)."""
    return make_chest_phantom(ChestSpec(slices=16))


def dcmqi(name: str) -> str:
    """Path of a dcmqi command (the PyPI ``dcmqi`` puts it beside the interpreter); skips (or
    fails under DICOM_NODE_REQUIRE_TOOLS=1) without it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        require_tool(name)
    assert found is not None
    return found


def tilted_series(phantom: Phantom, tilt_deg: float, tmp: Path, enhanced: bool = False) -> LoadedSeries:
    """The phantom acquired with gantry tilt ``tilt_deg`` (table along z, planes tilted about
    x), as single frames or one enhanced MR with its geometry per frame."""
    dz, dy, _ = phantom.spacing
    affine = quirks.tilted_affine(phantom.hu.shape, dy, dz, tilt_deg)
    affine[:3, 3] = phantom.affine[:3, 3]
    seed = f"resampled-{tilt_deg:g}-{'enh' if enhanced else 'sf'}"
    tilted = dataclasses.replace(phantom, affine=affine)
    info = quirks.series_info(seed, modality="MR" if enhanced else "CT")
    datasets = slice_datasets(tilted.hu, tilted.affine, info)
    if enhanced:
        one = quirks.enhanced(datasets, seed)
        quirks.functional_group_layout(one, "per-frame")
        datasets = [one]
    return load_series(write_datasets(datasets, tmp / seed))


def prediction_of(phantom: Phantom) -> Prediction:
    """The body and a small box (a "nodule") near one edge of the stack, overlapping it."""
    box = np.zeros(phantom.hu.shape, dtype=bool)
    box[2:6, 30:40, 20:28] = True
    return Prediction("m", "1", [Segment(BODY_LABEL, phantom.masks["body"]),
                                 Segment(NODULE_LABEL, box, tracking_id="Nodule 1")])


def encode(loaded: LoadedSeries, prediction: Prediction, **options: str) -> dict[str, list[Dataset]]:
    return encode_outputs(prediction, loaded.volume, loaded.sources, loaded.frame_refs,
                          ["seg", KIND], ResultOptions(**options))  # type: ignore[arg-type]


def to_nrrd(seg: Dataset, tmp: Path, name: str) -> tuple[list[Path], str]:
    """Run segimage2itkimage on ``seg``: the NRRD files it wrote and its output (it exits 0 even
    when it writes no volume, so the files are the evidence)."""
    path = tmp / f"{name}.dcm"
    seg.save_as(path, enforce_file_format=True)
    out = tmp / f"{name}-nrrd"
    out.mkdir()
    res = procs.run_tool([dcmqi("segimage2itkimage"), "--inputDICOM", str(path),
                          "--outputDirectory", str(out), "-t", "nrrd"])
    return sorted(out.glob("*.nrrd")), res.stdout + res.stderr


def source_indices(nrrd: Path, affine: np.ndarray) -> np.ndarray:
    """Continuous (slice, row, column) source indices of every non-zero voxel of ``nrrd``."""
    image = sitk.ReadImage(str(nrrd))
    voxels = np.argwhere(sitk.GetArrayFromImage(image) > 0)[:, ::-1]  # (x, y, z) order
    origin = np.asarray(image.GetOrigin())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = origin + (voxels * np.asarray(image.GetSpacing())) @ direction.T
    return np.asarray(np.linalg.solve(affine[:3, :3], (points - affine[:3, 3]).T).T)


def assert_on_the_mask(indices: np.ndarray, mask: np.ndarray, pixel_tolerance: float) -> None:
    """Every voxel dcmqi wrote lies on its source plane, within ``pixel_tolerance`` pixels of a
    mask voxel in-plane, and together they are exactly the mask's voxels."""
    nearest = np.rint(indices).astype(np.int64)
    residual = np.abs(indices - nearest)
    assert float(residual[:, 0].max()) < 1e-3, "a voxel lies between source planes"
    assert float(residual[:, 1:].max()) <= pixel_tolerance
    got = np.zeros(mask.shape, dtype=bool)
    got[tuple(nearest.T)] = True
    assert len(indices) == int(mask.sum())
    np.testing.assert_array_equal(got, mask)


def centroid_shift(indices: np.ndarray, mask: np.ndarray) -> float:
    """Largest in-plane distance (pixels) between the centroid of the voxels dcmqi put on a
    source plane and the centroid of the mask on that plane."""
    planes = np.rint(indices[:, 0]).astype(np.int64)
    shifts = [float(np.linalg.norm(indices[planes == k, 1:].mean(axis=0) -
                                   np.argwhere(mask[k]).mean(axis=0)))
              for k in np.unique(planes) if mask[k].any()]
    return max(shifts)


@pytest.mark.parametrize("tilt_deg", [TILT_DEG, -TILT_DEG], ids=["tilt+15", "tilt-15"])
def test_dcmqi_reads_the_resampled_seg_of_a_tilted_stack_onto_the_masks(
    phantom: Phantom, tmp_path: Path, tilt_deg: float
) -> None:
    """Tilted CT: dcmqi gets no volume (+15 deg) or a misplaced one (-15 deg) from the source-frame
    SEG, and from the resampled SEG a volume holding exactly the mask voxels, each within half a
    pixel of its source position."""
    loaded = tilted_series(phantom, tilt_deg, tmp_path)
    prediction = prediction_of(phantom)
    encoded = encode(loaded, prediction)
    assert len(encoded["seg"]) == 1 and len(encoded[KIND]) == 1
    affine = loaded.volume.affine

    files, text = to_nrrd(encoded["seg"][0], tmp_path, "source")
    if tilt_deg > 0:
        assert files == [] and "is outside image geometry" in text
    else:  # written without a word, but slice k is k * 5 sin(15 deg) mm off in-plane
        body = prediction.segments[0].mask
        assert centroid_shift(source_indices(files[0], affine), body) > 4.0

    files, text = to_nrrd(encoded[KIND][0], tmp_path, "resampled")
    assert [f.name for f in files] == ["1.nrrd", "2.nrrd"], text
    assert "ERROR" not in text, text
    for nrrd, segment in zip(files, prediction.segments, strict=True):
        indices = source_indices(nrrd, affine)
        assert_on_the_mask(indices, segment.mask, pixel_tolerance=0.5)
        assert centroid_shift(indices, segment.mask) <= 0.5


def test_dcmqi_reads_the_resampled_seg_of_a_stack_sheared_both_ways_feet_first(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Slices acquired feet-ward and sheared along both the rows and the columns: the grid moves
    planes both ways and dcmqi still gets the mask voxels."""
    affine = quirks.tilted_affine(phantom.hu.shape, 3.5, 5.0, -12.0)
    affine[:3, 0] = (1.2, 0.0, -5.0)  # 1.2 mm sideways per slice, towards the feet
    affine[:3, 3] = phantom.affine[:3, 3]
    datasets = slice_datasets(phantom.hu, affine, quirks.series_info("resampled-oblique"))
    loaded = load_series(write_datasets(datasets, tmp_path / "ct"))
    grid = orthogonal_grid(loaded.volume)
    assert grid is not None and grid.shift[:, 0].max() > 0 and grid.shift[:, 1].max() > 0
    # Grid voxel (k, 0, 0) of every plane lies on one line along the plane normal.
    steps = np.diff(grid.positions, axis=0)
    np.testing.assert_allclose(np.linalg.norm(steps, axis=1), grid.step, atol=1e-6)
    np.testing.assert_allclose(steps / grid.step, np.broadcast_to(steps[0] / grid.step, steps.shape), atol=1e-9)
    prediction = prediction_of(phantom)
    # The loader stacks the slices along the plane normal: head-ward, the acquisition reversed.
    np.testing.assert_allclose(loaded.volume.affine[:3, 0], -affine[:3, 0], atol=1e-3)
    prediction = Prediction("m", "1", [Segment(s.label, s.mask[::-1].copy(), tracking_id=s.tracking_id)
                                       for s in prediction.segments])
    files, text = to_nrrd(encode(loaded, prediction)[KIND][0], tmp_path, "resampled")
    assert [f.name for f in files] == ["1.nrrd", "2.nrrd"], text
    for nrrd, segment in zip(files, prediction.segments, strict=True):
        assert_on_the_mask(source_indices(nrrd, loaded.volume.affine), segment.mask, pixel_tolerance=0.5)


@pytest.mark.parametrize("seg_type", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_dcmqi_reads_the_resampled_seg_of_a_tilted_enhanced_mr(
    phantom: Phantom, tmp_path: Path, seg_type: str
) -> None:
    """An enhanced MR with its geometry only per frame, tilted: the resampled SEG (binary,
    fractional or label map) converts to the mask voxels."""
    loaded = tilted_series(phantom, TILT_DEG, tmp_path, enhanced=True)
    prediction = prediction_of(phantom)
    if seg_type == "LABELMAP":  # disjoint segments only
        body = prediction.segments[0].mask & ~prediction.segments[1].mask
        prediction = Prediction("m", "1", [Segment(BODY_LABEL, body), prediction.segments[1]])
    encoded = encode(loaded, prediction, segmentation_type=seg_type)
    files, text = to_nrrd(encoded[KIND][0], tmp_path, "resampled")
    assert "ERROR" not in text, text
    if seg_type != "LABELMAP":  # one volume per segment
        assert [f.name for f in files] == ["1.nrrd", "2.nrrd"], text
        per_segment = files
    else:  # one label map holding the segment numbers
        assert [f.name for f in files] == ["1.nrrd"], text
        labels = sitk.ReadImage(str(files[0]))
        per_segment = []
        for number in (1, 2):
            one = sitk.GetImageFromArray((sitk.GetArrayFromImage(labels) == number).astype(np.uint8))
            one.CopyInformation(labels)
            per_segment.append(tmp_path / f"label-{number}.nrrd")
            sitk.WriteImage(one, str(per_segment[-1]))
    for nrrd, segment in zip(per_segment, prediction.segments, strict=True):
        assert_on_the_mask(source_indices(nrrd, loaded.volume.affine), segment.mask, pixel_tolerance=0.5)


def test_resampled_seg_is_valid_and_keeps_frame_of_reference_and_tracking(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """The resampled SEG passes dciodvfy; it has its own series (number offset 8), the source's
    Frame of Reference, the segments' TrackingUIDs, the normal step as SpacingBetweenSlices,
    one frame per non-empty (segment, plane), each referencing its coplanar source image with
    Spatial Locations Preserved NO; highdicom reads it back to the masks."""
    loaded = tilted_series(phantom, TILT_DEG, tmp_path)
    prediction = prediction_of(phantom)
    encoded = encode(loaded, prediction)
    source_seg, seg = encoded["seg"][0], encoded[KIND][0]
    path = tmp_path / "resampled.dcm"
    seg.save_as(path, enforce_file_format=True)
    dciodvfy_clean(path)

    assert seg.SeriesInstanceUID != source_seg.SeriesInstanceUID
    assert seg.SOPInstanceUID != source_seg.SOPInstanceUID
    assert int(seg.SeriesNumber) == int(source_seg.SeriesNumber) + 7  # offsets 1 and 8
    assert seg.FrameOfReferenceUID == loaded.sources[0].FrameOfReferenceUID
    assert [s.TrackingUID for s in seg.SegmentSequence] == [
        s.TrackingUID for s in source_seg.SegmentSequence]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(5.0 * np.cos(np.radians(TILT_DEG)), abs=1e-4)
    grid = orthogonal_grid(loaded.volume)
    assert grid is not None
    assert (seg.Rows, seg.Columns) == grid.shape[1:] and seg.Rows > loaded.sources[0].Rows
    expected_frames = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in prediction.segments)
    assert seg.NumberOfFrames == expected_frames
    by_uid = {ds.SOPInstanceUID: ds for ds in loaded.sources}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.SpatialLocationsPreserved == "NO"
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        image = by_uid[source.ReferencedSOPInstanceUID]
        normal = np.cross(*np.asarray(image.ImageOrientationPatient, dtype=float).reshape(2, 3))
        offset = position - np.asarray(image.ImagePositionPatient, dtype=float)
        assert abs(float(offset @ normal)) < 1e-3  # coplanar with the frame it references

    back = hd.seg.segread(path)
    volume = back.get_volume(combine_segments=False)
    assert volume.array.shape[-1] == 2
    for s, segment in enumerate(prediction.segments):
        assert int(volume.array[..., s].sum()) == int(segment.mask.sum())


def test_untilted_and_stacked_series_get_no_resampled_seg(phantom: Phantom, tmp_path: Path) -> None:
    """An untilted stack's SEG already is orthogonal: asking for ``seg-resampled`` adds nothing
    and the ``seg`` is the same as without it.  A tilted series of two stacks of different
    spacing has no single slice step to put a grid on: none either (documented)."""
    loaded = load_series(write_datasets(
        slice_datasets(phantom.hu, phantom.affine, quirks.series_info("resampled-straight")),
        tmp_path / "ct"))
    assert orthogonal_grid(loaded.volume) is None
    prediction = prediction_of(phantom)
    both = encode(loaded, prediction)
    alone = encode_outputs(prediction, loaded.volume, loaded.sources, loaded.frame_refs, ["seg"])
    assert both[KIND] == []
    assert both["seg"][0].PixelData == alone["seg"][0].PixelData
    assert both["seg"][0].SOPInstanceUID == alone["seg"][0].SOPInstanceUID

    affine = quirks.tilted_affine(phantom.hu.shape, 3.5, 4.0, tilt_deg=TILT_DEG)
    affine[:3, 3] = phantom.affine[:3, 3]
    info = quirks.series_info("resampled-two-stacks")
    datasets = quirks.with_positions(quirks.stack(phantom.hu, affine, info),
                                     quirks.stacked_positions(affine, (8, 8), (4.0, 7.0)))
    stacked = load_series(write_datasets(datasets, tmp_path / "stacked"))
    assert isinstance(stacked.volume, StackedVolume)
    assert encode(stacked, prediction)[KIND] == []


@pytest.mark.slow
def test_cornerstone_reads_the_tilted_seg_and_refuses_the_resampled_one(
    phantom: Phantom, tmp_path: Path
) -> None:
    """OHIF's SEG reader (@cornerstonejs/adapters, as OHIF 3.13.2 bundles it) reads the
    source-frame SEG of a tilted stack voxel for voxel on the right slices, and refuses the
    resampled one (its frames are not the source's Rows x Columns): OHIF destinations get
    ``seg``, dcmqi/Slicer destinations ``seg-resampled`` as well."""
    from tests.unit.test_results_dcmjs import VIEWER, _node_modules

    _node_modules()
    loaded = tilted_series(phantom, TILT_DEG, tmp_path)
    prediction = prediction_of(phantom)
    encoded = encode(loaded, prediction)
    sources = []
    for k, (i, _) in enumerate(loaded.frame_refs):
        path = tmp_path / f"source-{k:03d}.dcm"
        loaded.sources[i].save_as(path, enforce_file_format=True)
        sources.append(str(path))

    def parse(seg: Dataset, name: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}.dcm"
        seg.save_as(path, enforce_file_format=True)
        return subprocess.run([shutil.which("node") or "node", "parse_results.mjs", "--sources", *sources,
                               "--results", str(path)], cwd=VIEWER, capture_output=True, text=True,
                              timeout=120, check=False)

    res = parse(encoded["seg"][0], "source")
    assert res.returncode == 0, res.stderr[-3000:]
    (summary,) = json.loads(res.stdout)
    for number, segment in enumerate(prediction.segments, start=1):
        got = summary["segments"][str(number)]
        assert got["voxels"] == int(segment.mask.sum())
        assert got["slices"] == np.flatnonzero(segment.mask.any(axis=(1, 2))).tolist()

    res = parse(encoded[KIND][0], "resampled")
    assert res.returncode != 0 and "different geometry dimensions (Rows and Columns)" in res.stderr


def test_kos_references_the_resampled_seg(phantom: Phantom, tmp_path: Path) -> None:
    """A KOS encoded with the resampled SEG lists it among the referenced results."""
    loaded = tilted_series(phantom, TILT_DEG, tmp_path)
    encoded = encode_outputs(prediction_of(phantom), loaded.volume, loaded.sources,
                             loaded.frame_refs, ["seg", KIND, "kos"])
    (kos,) = encoded["kos"]
    referenced = {item.ReferencedSOPInstanceUID
                  for study in kos.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence
                  for item in series.ReferencedSOPSequence}
    assert encoded[KIND][0].SOPInstanceUID in referenced
    assert encoded["seg"][0].SOPInstanceUID in referenced
