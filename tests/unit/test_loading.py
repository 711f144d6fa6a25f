"""Series -> Volume loading on phantom series carrying real scanners' quirks."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.demo import Phantom, axial_affine, write_datasets
from dicom_node.errors import PermanentError
from dicom_node.imaging.loading import LoadedSeries, SeriesError, load_series
from inference.stacks import StackedVolume
from tests.support import procs, quirks

ATOL_MM = 1e-3  # DS values carry 6 significant digits


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """12 slices of 32x32 at 10 mm, 5 mm apart."""
    return quirks.small_phantom()


def _stack(phantom: Phantom, seed: str = "plain") -> list[Dataset]:
    return quirks.stack(phantom.hu, phantom.affine, quirks.series_info(seed))


def _frame_geometry(ds: Dataset, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of one frame of ``ds``."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        item = ds.PerFrameFunctionalGroupsSequence[frame - 1]
        shared = ds.SharedFunctionalGroupsSequence[0]

        def get(seq: str, kw: str) -> list[float]:
            owner = item if seq in item else shared
            return [float(v) for v in owner[seq].value[0][kw].value]

        return (np.array(get("PlanePositionSequence", "ImagePositionPatient")),
                np.array(get("PlaneOrientationSequence", "ImageOrientationPatient")),
                np.array(get("PixelMeasuresSequence", "PixelSpacing")))
    return (np.array([float(v) for v in ds.ImagePositionPatient]),
            np.array([float(v) for v in ds.ImageOrientationPatient]),
            np.array([float(v) for v in ds.PixelSpacing]))


def _assert_voxels_at_source_positions(loaded: LoadedSeries) -> None:
    """Every slice's corner voxels map to IPP + row/column offsets of the frame it came from."""
    rows, cols = loaded.volume.shape[1:]
    for k, (src, frame) in enumerate(loaded.frame_refs):
        ipp, iop, spacing = _frame_geometry(loaded.sources[src], frame)
        for j, i in ((0, 0), (rows - 1, 0), (0, cols - 1), (rows - 1, cols - 1)):
            expected = ipp + j * spacing[0] * iop[3:] + i * spacing[1] * iop[:3]
            got = loaded.volume.index_to_patient(np.array([k, j, i]))
            np.testing.assert_allclose(got, expected, atol=ATOL_MM)


def _load(datasets: list[Dataset], out: Path, **kwargs: str) -> LoadedSeries:
    return load_series(write_datasets(datasets, out), **kwargs)


# --- ordering ------------------------------------------------------------------------------


def test_shuffled_instance_numbers_sort_along_normal(phantom: Phantom, tmp_path: Path) -> None:
    """Slices are ordered along the normal whatever the InstanceNumbers and the file order."""
    datasets = quirks.shuffle_instance_numbers(_stack(phantom), seed=3)
    paths = write_datasets(datasets, tmp_path)
    loaded = load_series(sorted(paths, key=lambda p: p.name))
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    assert loaded.volume.array.dtype == np.float32
    assert loaded.excluded == []
    _assert_voxels_at_source_positions(loaded)


def test_reversed_instance_numbers_head_first(phantom: Phantom, tmp_path: Path) -> None:
    """InstanceNumber 1 at the head does not flip a head-first stack."""
    loaded = _load(quirks.reverse_instance_numbers(_stack(phantom)), tmp_path)
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


def test_feet_first_stack_geometry(phantom: Phantom, tmp_path: Path) -> None:
    """A feet-first stack (rows to patient right) keeps its exact affine, slice axis to the feet."""
    affine = quirks.feet_first_affine(phantom.hu.shape, 10.0, 5.0)
    datasets = quirks.shuffle_instance_numbers(
        quirks.stack(phantom.hu, affine, quirks.series_info("ffs", body_part="CHEST")), seed=1)
    loaded = _load(datasets, tmp_path)
    np.testing.assert_allclose(loaded.volume.affine, affine, atol=ATOL_MM)
    np.testing.assert_allclose(loaded.volume.affine[:3, 0], (0.0, 0.0, -5.0), atol=ATOL_MM)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    _assert_voxels_at_source_positions(loaded)


@settings(max_examples=15, deadline=None)
@given(
    angles=st.tuples(*(st.floats(-math.pi, math.pi) for _ in range(3))),
    order_seed=st.integers(0, 1000),
)
def test_oblique_orientations_affine_exact(
    angles: tuple[float, float, float], order_seed: int
) -> None:
    """For any oblique orientation and file order, every voxel maps to its source position."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    rotation = rz @ ry @ rx
    affine = axial_affine((4, 8, 8), 2.0, 3.0)
    affine[:3, :] = rotation @ affine[:3, :]
    hu = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    datasets = quirks.shuffle_instance_numbers(
        quirks.stack(hu, affine, quirks.series_info("oblique")), seed=order_seed)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _load(datasets, Path(tmp))
    np.testing.assert_allclose(loaded.volume.affine[:3, 1:], affine[:3, 1:], atol=1e-4)
    _assert_voxels_at_source_positions(loaded)
    normal = np.cross(affine[:3, 2], affine[:3, 1])
    assert float(np.dot(loaded.volume.affine[:3, 0], normal)) > 0  # ascending along the normal
    idx = [0, 1, 2, 3] if np.dot(affine[:3, 0], normal) > 0 else [3, 2, 1, 0]
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(hu)[idx])


# --- gantry tilt and spacing ---------------------------------------------------------------


def test_gantry_tilt_kept_exactly_as_shear(phantom: Phantom, tmp_path: Path) -> None:
    """A 15 degree gantry tilt keeps the sheared slice axis: voxels sit at their true positions."""
    affine = quirks.tilted_affine(phantom.hu.shape, 10.0, 5.0, tilt_deg=15.0)
    datasets = quirks.shuffle_instance_numbers(
        quirks.stack(phantom.hu, affine, quirks.series_info("tilt")), seed=2)
    loaded = _load(datasets, tmp_path)
    np.testing.assert_allclose(loaded.volume.affine, affine, atol=ATOL_MM)
    np.testing.assert_allclose(loaded.volume.affine[:3, 0], (0.0, 0.0, 5.0), atol=ATOL_MM)
    assert float(loaded.volume.metadata["gantry_tilt_deg"]) == pytest.approx(15.0, abs=1e-3)
    _assert_voxels_at_source_positions(loaded)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


def test_untilted_series_has_no_tilt_note(phantom: Phantom, tmp_path: Path) -> None:
    """A regular axial stack carries no gantry tilt note."""
    loaded = _load(_stack(phantom), tmp_path)
    assert "gantry_tilt_deg" not in loaded.volume.metadata


def test_two_spacings_load_as_two_stacks_never_averaged(phantom: Phantom, tmp_path: Path) -> None:
    """Steps of 2.5 then 5 mm make two stacks, each with its exact affine, never one averaged."""
    positions = quirks.irregular_positions(phantom.affine, [2.5] * 5 + [5.0] * 6)
    loaded = _load(quirks.with_positions(_stack(phantom), positions), tmp_path)
    assert isinstance(loaded.volume, StackedVolume)
    assert loaded.volume.stacks == ((0, 6), (6, 12))
    assert [float(np.linalg.norm(a[:3, 0])) for a in loaded.volume.stack_affines] == pytest.approx(
        [2.5, 5.0], abs=1e-4)
    assert loaded.volume.metadata["stacks"] == "2 regular stacks: 6 slices at 2.5 mm, then 6 slices at 5 mm"
    _assert_voxels_at_source_positions(loaded)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


def test_tilted_head_ct_of_two_spacings_loads_each_stack_exactly(tmp_path: Path) -> None:
    """14 slices at 4.2 mm then 14 at 7.4 mm with 15 degree tilt: two sheared stacks, exact voxels."""
    head = quirks.small_phantom(slices=28)
    affine = quirks.tilted_affine(head.hu.shape, 10.0, 4.2, tilt_deg=15.0)
    positions = quirks.stacked_positions(affine, (14, 14), (4.2, 7.4))
    datasets = quirks.with_positions(quirks.stack(head.hu, affine, quirks.series_info("head-ct")), positions)
    loaded = _load(quirks.shuffle_instance_numbers(datasets, seed=5), tmp_path)
    volume = loaded.volume
    assert isinstance(volume, StackedVolume) and volume.stacks == ((0, 14), (14, 28))
    for stack, spacing in zip(volume.stack_volumes(), (4.2, 7.4), strict=True):
        np.testing.assert_allclose(stack.affine[:3, 0], (0.0, 0.0, spacing), atol=ATOL_MM)
        np.testing.assert_allclose(stack.affine[:3, 1:3], affine[:3, 1:3], atol=ATOL_MM)
        assert float(stack.metadata["gantry_tilt_deg"]) == pytest.approx(15.0, abs=1e-3)
        assert stack.shape == (14, 32, 32)
    _assert_voxels_at_source_positions(loaded)
    np.testing.assert_array_equal(volume.array, quirks.stored_hu(head.hu))
    with pytest.raises(ValueError, match="no single slice spacing"):
        _ = volume.spacing


def test_missing_slice_refused_naming_where(phantom: Phantom, tmp_path: Path) -> None:
    """One missing slice (a 10 mm gap in 5 mm steps) is refused as such, with its two neighbours."""
    z = phantom.affine[2, 3] + 5.0 * np.arange(12)
    datasets = quirks.drop(_stack(phantom), 6)
    match = (rf"a slice is missing between z={z[5]:.4g} and z={z[7]:.4g} mm: a 10 mm step where "
             r"the slices on either side are 5 mm apart")
    with pytest.raises(SeriesError, match=match):
        _load(datasets, tmp_path)


@pytest.mark.parametrize(("dropped", "message"), [
    ((1,), r"a slice is missing between z=\S+ and z=\S+ mm: a 10 mm step"),
    ((10,), r"a slice is missing between z=\S+ and z=\S+ mm: a 10 mm step"),
    ((5, 6), r"2 slices are missing between z=\S+ and z=\S+ mm: a 15 mm step"),
])
def test_missing_slices_near_the_ends_or_several_are_named(
    phantom: Phantom, tmp_path: Path, dropped: tuple[int, ...], message: str
) -> None:
    """A missing second or second-to-last slice, or two in a row, are refused as missing slices."""
    with pytest.raises(SeriesError, match=message):
        _load(quirks.drop(_stack(phantom), *dropped), tmp_path)


def test_gap_between_two_stacks_refused_naming_both_spacings(phantom: Phantom, tmp_path: Path) -> None:
    """Two spacings with a 12 mm gap between the stacks: refused, both stacks and the gap named."""
    positions = quirks.stacked_positions(phantom.affine, (6, 6), (2.5, 5.0), boundaries=(12.0,))
    datasets = quirks.with_positions(_stack(phantom), positions)
    match = (r"two spacings: 6 slices at 2\.5 mm then 6 slices at 5 mm, with a gap of 12 mm between "
             r"z=\S+ and z=\S+ mm: slices are missing between the two stacks")
    with pytest.raises(SeriesError, match=match):
        _load(datasets, tmp_path)


def test_odd_gap_in_one_spacing_refused(phantom: Phantom, tmp_path: Path) -> None:
    """A 7.3 mm step between 5 mm steps is no whole number of slices: refused, step named."""
    positions = quirks.irregular_positions(phantom.affine, [5.0] * 5 + [7.3] + [5.0] * 5)
    match = r"a gap of 7\.3 mm between z=\S+ and z=\S+ mm, where the slices on either side are 5 mm apart"
    with pytest.raises(SeriesError, match=match):
        _load(quirks.with_positions(_stack(phantom), positions), tmp_path)


def test_spacing_jitter_within_tolerance_loads(phantom: Phantom, tmp_path: Path) -> None:
    """Position jitter of 0.004 mm (rounding in the header) loads with the mean step."""
    jitter = np.array([0.004 if k % 2 else -0.004 for k in range(11)])
    positions = quirks.irregular_positions(phantom.affine, list(5.0 + jitter))
    loaded = _load(quirks.with_positions(_stack(phantom), positions), tmp_path)
    assert loaded.volume.spacing[0] == pytest.approx(5.0, abs=1e-3)


def test_spacing_drift_beyond_tolerance_refused(phantom: Phantom, tmp_path: Path) -> None:
    """Steps varying by 0.2 mm (4 %) are refused even though each looks plausible alone."""
    positions = quirks.irregular_positions(phantom.affine, [4.9, 5.1] * 5 + [5.0])
    match = r"irregular slice spacing: steps between 4\.9 and 5\.1 mm"
    with pytest.raises(SeriesError, match=match):
        _load(quirks.with_positions(_stack(phantom), positions), tmp_path)


# --- duplicates ----------------------------------------------------------------------------


def test_duplicate_image_in_other_transfer_syntax_refused(phantom: Phantom, tmp_path: Path) -> None:
    """One slice stored again (new SOP, RLE) is not stacked: the series is refused."""
    datasets = _stack(phantom)
    dup = quirks.duplicate(datasets[4], "dup", RLELossless)
    with pytest.raises(SeriesError, match=r"2 images share the slice position .*refusing to stack"):
        _load([*datasets, dup], tmp_path)


def test_same_sop_instance_twice_refused(phantom: Phantom, tmp_path: Path) -> None:
    """The same SOPInstanceUID in two files is refused naming the UID."""
    paths = write_datasets(_stack(phantom), tmp_path / "a")
    copy_path = tmp_path / "copy.dcm"
    shutil.copy(paths[3], copy_path)
    sop = pydicom.dcmread(paths[3], stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(SeriesError, match=rf"SOP instance {sop} appears in 2 files"):
        load_series([*paths, copy_path])


def test_two_echoes_split_first_echo_kept(phantom: Phantom, tmp_path: Path) -> None:
    """A dual-echo MR series loads echo 1 and lists every echo 2 image as excluded."""
    info = quirks.series_info("echo", modality="MR")
    datasets = quirks.shuffle_instance_numbers(quirks.multi_echo(phantom.hu, phantom.affine, info))
    loaded = _load(datasets, tmp_path)
    assert loaded.volume.modality == "MR"
    np.testing.assert_array_equal(loaded.volume.array, np.round(phantom.hu))
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)
    assert all(int(ds.EchoNumbers) == 1 for ds in loaded.sources)
    assert len(loaded.excluded) == 12
    assert all("EchoNumbers=2 shares slice positions with EchoNumbers=1" in r
               for _, r in loaded.excluded)


def test_partial_rescan_keeps_fullest_acquisition(phantom: Phantom, tmp_path: Path) -> None:
    """Slices rescanned as AcquisitionNumber 2 are excluded; the complete acquisition 1 is kept."""
    datasets = quirks.second_acquisition(_stack(phantom), [3, 4, 5, 6], "rescan")
    loaded = _load(datasets, tmp_path)
    assert loaded.volume.shape == (12, 32, 32)
    assert [r for _, r in loaded.excluded] == [
        "acquisition AcquisitionNumber=2 shares slice positions with AcquisitionNumber=1, "
        "which was kept"] * 4
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


def test_disjoint_acquisitions_not_split(phantom: Phantom, tmp_path: Path) -> None:
    """AcquisitionNumber 1 and 2 on disjoint halves of a stack load as one volume."""
    datasets = _stack(phantom)
    for ds in datasets[6:]:
        ds.AcquisitionNumber = 2
    loaded = _load(datasets, tmp_path)
    assert loaded.volume.shape == (12, 32, 32) and loaded.excluded == []


def test_duplicate_not_explained_by_acquisition_refused(phantom: Phantom, tmp_path: Path) -> None:
    """A duplicated slice is refused even though AcquisitionNumber varies elsewhere in the stack."""
    datasets = _stack(phantom)
    for ds in datasets[6:]:
        ds.AcquisitionNumber = 2
    dup = quirks.duplicate(datasets[2], "dup-acq")
    with pytest.raises(SeriesError, match=r"2 images share the slice position"):
        _load([*datasets, dup], tmp_path)


# --- localizers and orientations -----------------------------------------------------------


def test_localizer_and_reformats_excluded(phantom: Phantom, tmp_path: Path) -> None:
    """A scout and three sagittal reformats are excluded with reasons; the axial stack loads."""
    info = quirks.series_info("mixed")
    datasets = quirks.stack(phantom.hu, phantom.affine, info)
    scout = quirks.localizer(info, "mixed")
    reformats = quirks.sagittal_reformats(info, "mixed", 3, 32)
    loaded = _load([scout, *datasets, *reformats], tmp_path)
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)
    reasons = dict(loaded.excluded)
    assert reasons[scout.SOPInstanceUID] == "localizer (ImageType contains LOCALIZER)"
    for ds in reformats:
        assert reasons[ds.SOPInstanceUID].startswith("ImageOrientationPatient [0, 1, 0, 0, 0, -1]")
    assert len(loaded.sources) == 12


def test_mixed_orientations_without_majority_refused(phantom: Phantom, tmp_path: Path) -> None:
    """Three axial and three sagittal images give no single stack: refused."""
    info = quirks.series_info("tie")
    axial = quirks.stack(phantom.hu[:3], phantom.affine, info)
    sagittal = quirks.sagittal_reformats(info, "tie", 3, 32)
    with pytest.raises(SeriesError, match=r"mixed orientations \(3 with .*; 3 with"):
        _load([*axial, *sagittal], tmp_path)


def test_only_localizers_refused(phantom: Phantom, tmp_path: Path) -> None:
    """A series of only a scout has nothing to stack: refused with the reason."""
    scout = quirks.localizer(quirks.series_info("scout"), "scout")
    with pytest.raises(SeriesError, match=r"no image of the series can form a volume \(localizer"):
        _load([scout], tmp_path)


def test_different_matrix_refused(phantom: Phantom, tmp_path: Path) -> None:
    """One slice of 32x24 in a 32x32 series is refused naming both sizes."""
    datasets = _stack(phantom)
    quirks.with_matrix(datasets[5], 32, 24)
    with pytest.raises(SeriesError, match=r"differ in Rows x Columns: 32x32 \(11 images\), 32x24"):
        _load(datasets, tmp_path)


def test_different_pixel_spacing_refused(phantom: Phantom, tmp_path: Path) -> None:
    """One slice with another PixelSpacing is refused naming both spacings."""
    datasets = _stack(phantom)
    datasets[2].PixelSpacing = ["9.5", "9.5"]
    with pytest.raises(SeriesError, match=r"differ in PixelSpacing: \[10, 10\] mm \(11 images\), "
                                          r"\[9\.5, 9\.5\] mm \(1 images\)"):
        _load(datasets, tmp_path)


# --- enhanced multi-frame ------------------------------------------------------------------


@pytest.mark.parametrize("shuffle_seed", [None, 7])
def test_enhanced_ct_frames(phantom: Phantom, tmp_path: Path, shuffle_seed: int | None) -> None:
    """A Legacy Converted Enhanced CT (ordered or shuffled frames) loads exactly; frame_refs
    point at the frames."""
    enhanced = quirks.enhanced(_stack(phantom, "enh"), "enh", shuffle_seed=shuffle_seed)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    loaded = load_series([path])
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    assert len(loaded.sources) == 1 and "PixelData" not in loaded.sources[0]
    assert sorted(f for _, f in loaded.frame_refs) == list(range(1, 13))
    if shuffle_seed is not None:
        assert [f for _, f in loaded.frame_refs] != list(range(1, 13))
    _assert_voxels_at_source_positions(loaded)


def test_enhanced_mr_shuffled_frames(phantom: Phantom, tmp_path: Path) -> None:
    """A Legacy Converted Enhanced MR with shuffled frames loads in slice order."""
    info = quirks.series_info("enh-mr", modality="MR")
    datasets = quirks.stack(phantom.hu, phantom.affine, info)
    enhanced = quirks.enhanced(datasets, "enh-mr", shuffle_seed=3)
    path = tmp_path / "enhanced-mr.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    loaded = load_series([path], modality_hint="MR")
    np.testing.assert_array_equal(loaded.volume.array, np.round(phantom.hu))
    _assert_voxels_at_source_positions(loaded)


# --- compressed pixel data -----------------------------------------------------------------


@pytest.mark.parametrize(("codec", "syntax"), [
    ("jpeg-lossless-sv1", JPEGLosslessSV1),
    ("jpeg-ls-lossless", JPEGLSLossless),
    ("rle", RLELossless),
])
def test_dcmtk_compressed_lossless_exact(
    phantom: Phantom, tmp_path: Path, tool: Callable[..., None], codec: str, syntax: str
) -> None:
    """Files compressed by DCMTK (JPEG lossless SV1, JPEG-LS, RLE) decode to the exact HU."""
    tool(quirks.DCMTK_CODECS[codec][0])
    paths = write_datasets(_stack(phantom), tmp_path / "raw")
    compressed = quirks.dcmtk_compress(paths, tmp_path / codec, codec)
    loaded = load_series(compressed)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in loaded.sources} == {syntax}
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_pydicom_compressed_lossless_exact(phantom: Phantom, tmp_path: Path, syntax: str) -> None:
    """RLE and JPEG 2000 lossless (pydicom / openjpeg encoders) decode to the exact HU."""
    datasets = quirks.compress(_stack(phantom), pydicom.uid.UID(syntax))
    loaded = _load(datasets, tmp_path)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


def _dcmtk(paths: list[Path], out: Path, *command: str) -> list[Path]:
    """Run a DCMTK compressor command line (``dcmcjpeg +el ...``) on each of ``paths``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        procs.run_tool([*command, str(path), str(out / path.name)], check=True)
    return [out / path.name for path in paths]


def _pydicom_hu(paths: list[Path]) -> np.ndarray:
    """Reference voxels decoded by pydicom alone, one slice per file in slice order."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
                     for ds in datasets]).astype(np.float32)


@pytest.mark.parametrize("predictor", ["2", "6", "7"])
def test_jpeg_lossless_any_predictor_exact(
    phantom: Phantom, tmp_path: Path, tool: Callable[..., None], predictor: str
) -> None:
    """JPEG lossless process 14 with selection values other than 1 decodes to the exact HU."""
    tool("dcmcjpeg")
    paths = write_datasets(_stack(phantom), tmp_path / "raw")
    loaded = load_series(_dcmtk(paths, tmp_path / "jpeg", "dcmcjpeg", "+el", "+sv", predictor))
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in loaded.sources} == {JPEGLossless}
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


@pytest.mark.parametrize("codec", sorted(quirks.DCMTK_CODECS))
@pytest.mark.parametrize(("signed", "low", "high"), [(True, -2048, 2047), (False, -1024, 3071)])
def test_compressed_12_bit_exact(
    phantom: Phantom, tmp_path: Path, tool: Callable[..., None], codec: str, signed: bool,
    low: int, high: int,
) -> None:
    """12 bits stored, signed or unsigned with junk in the unused high bits, compressed by DCMTK,
    give the exact HU: the high bits are ignored (DCMTK's JPEG-LS keeps them in the stream)."""
    tool(quirks.DCMTK_CODECS[codec][0])
    datasets = quirks.bits_stored_12(_stack(phantom), signed=signed, high_bit_garbage=not signed)
    paths = quirks.dcmtk_compress(write_datasets(datasets, tmp_path / "raw"), tmp_path / codec, codec)
    loaded = load_series(paths)
    np.testing.assert_array_equal(loaded.volume.array, np.clip(quirks.stored_hu(phantom.hu), low, high))


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless, JPEG2000Lossless])
def test_compressed_monochrome1_inverted(phantom: Phantom, tmp_path: Path, syntax: str) -> None:
    """Compressed MONOCHROME1 slices are inverted within the stored range, giving the HU back."""
    datasets = quirks.compress(quirks.monochrome1(_stack(phantom)), pydicom.uid.UID(syntax))
    loaded = _load(datasets, tmp_path)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    assert loaded.volume.metadata["photometric"] == "MONOCHROME1 inverted"


def test_compressed_per_slice_rescale(phantom: Phantom, tmp_path: Path) -> None:
    """Per-slice RescaleSlope/RescaleIntercept are applied per slice to compressed frames too."""
    datasets = quirks.compress(quirks.per_slice_rescale(_stack(phantom)), pydicom.uid.UID(JPEGLSLossless))
    loaded = _load(datasets, tmp_path)
    np.testing.assert_array_equal(loaded.volume.array, 2.0 * np.round(quirks.stored_hu(phantom.hu) / 2.0))


def test_jpeg_ls_near_lossless_matches_pydicom(phantom: Phantom, tmp_path: Path, tool: Callable[..., None]) -> None:
    """JPEG-LS near-lossless (NEAR 2) decodes to what pydicom decodes, within 2 of the HU."""
    tool("dcmcjpls")
    datasets = quirks.bits_stored_12(_stack(phantom), signed=False)
    paths = _dcmtk(write_datasets(datasets, tmp_path / "raw"), tmp_path / "near", "dcmcjpls", "+en")
    loaded = load_series(paths)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in loaded.sources} == {JPEGLSNearLossless}
    np.testing.assert_array_equal(loaded.volume.array, _pydicom_hu(paths))
    expected = np.clip(quirks.stored_hu(phantom.hu), -1024, 3071)
    assert np.abs(loaded.volume.array - expected).max() <= 2.0


def test_lossy_jpeg_decoded_by_pydicom(phantom: Phantom, tmp_path: Path, tool: Callable[..., None]) -> None:
    """Syntaxes without a GIL-free decoder (here lossy JPEG extended, 12 bits) decode through
    pydicom, slice for slice as pydicom alone decodes them."""
    tool("dcmcjpeg")
    datasets = quirks.bits_stored_12(_stack(phantom), signed=False)
    paths = _dcmtk(write_datasets(datasets, tmp_path / "raw"), tmp_path / "lossy", "dcmcjpeg", "+ee")
    loaded = load_series(paths)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in loaded.sources} == {JPEGExtended12Bit}
    np.testing.assert_array_equal(loaded.volume.array, _pydicom_hu(paths))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_native_transfer_syntaxes_exact(phantom: Phantom, tmp_path: Path, syntax: str) -> None:
    """Implicit VR (pixel data read by the decoding threads), deflated and big endian (read by
    pydicom) native slices give the exact HU."""
    datasets = _stack(phantom)
    for ds in datasets:
        if syntax == ExplicitVRBigEndian:
            ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    loaded = _load(datasets, tmp_path)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in loaded.sources} == {syntax}
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))


def test_pixel_data_shorter_than_the_matrix_refused(phantom: Phantom, tmp_path: Path) -> None:
    """Native Pixel Data with fewer bytes than Rows x Columns need is refused naming the image."""
    datasets = _stack(phantom)
    datasets[4].PixelData = datasets[4].PixelData[:-64]
    with pytest.raises(SeriesError, match=rf"cannot decode the pixel data of image "
                                          rf"{datasets[4].SOPInstanceUID} .*holds 1984 bytes"):
        _load(datasets, tmp_path)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless])
def test_enhanced_compressed_frames(phantom: Phantom, tmp_path: Path, syntax: str) -> None:
    """A compressed enhanced multi-frame instance with shuffled frames loads exactly."""
    enhanced = quirks.enhanced(_stack(phantom, "enh-c"), "enh-c", shuffle_seed=5)
    enhanced.compress(pydicom.uid.UID(syntax))
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    loaded = load_series([path])
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    _assert_voxels_at_source_positions(loaded)


# --- pixel representations -----------------------------------------------------------------


@pytest.mark.parametrize(("signed", "garbage", "low", "high"), [
    (True, False, -2048, 2047),
    (False, False, -1024, 3071),
    (False, True, -1024, 3071),
])
def test_bits_stored_12(phantom: Phantom, tmp_path: Path, signed: bool, garbage: bool,
                        low: int, high: int) -> None:
    """12-bit signed and unsigned pixels (even with junk in the unused high bits) give exact HU."""
    datasets = quirks.bits_stored_12(_stack(phantom), signed=signed, high_bit_garbage=garbage)
    loaded = _load(datasets, tmp_path)
    np.testing.assert_array_equal(loaded.volume.array,
                                  np.clip(quirks.stored_hu(phantom.hu), low, high))


def test_monochrome1_inverted_so_larger_is_brighter(phantom: Phantom, tmp_path: Path) -> None:
    """MONOCHROME1 slices are inverted within the stored range, giving back the original HU."""
    loaded = _load(quirks.monochrome1(_stack(phantom)), tmp_path)
    np.testing.assert_array_equal(loaded.volume.array, quirks.stored_hu(phantom.hu))
    assert loaded.volume.metadata["photometric"] == "MONOCHROME1 inverted"


def test_per_slice_rescale_applied_per_slice(phantom: Phantom, tmp_path: Path) -> None:
    """Different RescaleSlope/RescaleIntercept per slice (slopes 0.25..2) are applied per slice."""
    datasets = quirks.per_slice_rescale(_stack(phantom))
    assert len({(ds.RescaleSlope, ds.RescaleIntercept) for ds in datasets}) == 4
    loaded = _load(datasets, tmp_path)
    expected = 2.0 * np.round(quirks.stored_hu(phantom.hu) / 2.0)
    np.testing.assert_array_equal(loaded.volume.array, expected)


# --- missing attributes --------------------------------------------------------------------


def test_missing_type2_attributes_tolerated(phantom: Phantom, tmp_path: Path) -> None:
    """No PatientBirthDate, PatientSex, SliceThickness or SliceLocation still loads exactly."""
    datasets = quirks.without(_stack(phantom), *quirks.TYPE2_REMOVED)
    loaded = _load(datasets, tmp_path)
    np.testing.assert_allclose(loaded.volume.affine, phantom.affine, atol=ATOL_MM)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_missing_geometry_refused(phantom: Phantom, tmp_path: Path, keyword: str) -> None:
    """A slice without ImagePositionPatient or ImageOrientationPatient is refused naming it."""
    datasets = quirks.without(_stack(phantom), keyword, index=7)
    sop = datasets[7].SOPInstanceUID
    with pytest.raises(SeriesError, match=rf"image {sop} has no {keyword}"):
        _load(datasets, tmp_path)


def test_one_slice_uses_slice_thickness(phantom: Phantom, tmp_path: Path) -> None:
    """A one-image series loads as one slice whose step is SliceThickness along the normal."""
    loaded = _load(_stack(phantom)[:1], tmp_path)
    assert loaded.volume.shape == (1, 32, 32)
    np.testing.assert_allclose(loaded.volume.affine[:3, 0], (0.0, 0.0, 5.0), atol=ATOL_MM)
    assert loaded.volume.metadata["slice_step_source"] == "SliceThickness"


def test_one_slice_without_thickness_uses_1mm(phantom: Phantom, tmp_path: Path) -> None:
    """A one-image series without SliceThickness gets a 1 mm step along the normal."""
    loaded = _load(quirks.without(_stack(phantom)[:1], "SliceThickness"), tmp_path)
    np.testing.assert_allclose(loaded.volume.affine[:3, 0], (0.0, 0.0, 1.0), atol=ATOL_MM)


# --- damaged and foreign files -------------------------------------------------------------


def test_truncated_pixel_data_refused_naming_sop(phantom: Phantom, tmp_path: Path) -> None:
    """A file cut inside its pixel data is refused naming the SOP instance and the file."""
    paths = write_datasets(_stack(phantom), tmp_path)
    sop = pydicom.dcmread(paths[2], stop_before_pixels=True).SOPInstanceUID
    quirks.truncate(paths[2], paths[2].stat().st_size - 500)
    with pytest.raises(SeriesError, match=rf"cannot decode the pixel data of image {sop} "
                                          rf"\(file {paths[2].name}\)"):
        load_series(paths)


def test_truncated_header_refused(phantom: Phantom, tmp_path: Path) -> None:
    """A file cut inside its header (no pixel data left) is refused as truncated."""
    paths = write_datasets(_stack(phantom), tmp_path)
    quirks.truncate(paths[0], 1200)
    with pytest.raises(SeriesError, match=rf"{paths[0].name}.* truncated"):
        load_series(paths)


def test_garbage_file_refused_naming_file(phantom: Phantom, tmp_path: Path) -> None:
    """A non-DICOM file in the series is refused naming the file."""
    paths = write_datasets(_stack(phantom), tmp_path)
    bad = quirks.garbage_file(tmp_path / "junk.dcm")
    with pytest.raises(SeriesError, match=r"cannot read file junk\.dcm"):
        load_series([*paths, bad])


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "FrameOfReferenceUID"])
def test_foreign_instance_refused(phantom: Phantom, tmp_path: Path, keyword: str) -> None:
    """An instance of another series or frame of reference mixed in is refused."""
    datasets = _stack(phantom)
    setattr(datasets[3], keyword, quirks.uid("foreign", keyword))
    with pytest.raises(SeriesError, match=rf"the files mix 2 {keyword} values"):
        _load(datasets, tmp_path)


# --- contract ------------------------------------------------------------------------------


def test_series_error_is_permanent() -> None:
    """SeriesError fails a job (PermanentError), it is not retried."""
    assert issubclass(SeriesError, PermanentError)


def test_sources_headers_only_and_metadata_not_identifying(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Sources carry headers without pixel data; metadata holds hints but no patient data."""
    info = quirks.series_info("meta")
    loaded = _load(quirks.stack(phantom.hu, phantom.affine, info), tmp_path)
    assert all("PixelData" not in ds and "SOPInstanceUID" in ds for ds in loaded.sources)
    assert loaded.frame_refs == [(k, 1) for k in range(12)]
    meta = loaded.volume.metadata
    assert meta["body_part"] == "CHEST" and loaded.volume.modality == "CT"
    for value in (info.patient_name, info.patient_id, info.patient_birth_date):
        assert all(str(value) not in v for v in meta.values())


def test_modality_hint(phantom: Phantom, tmp_path: Path) -> None:
    """A hint fills a missing Modality; a hint contradicting the files is refused."""
    paths = write_datasets(quirks.without(_stack(phantom), "Modality"), tmp_path / "none")
    assert load_series(paths, modality_hint="CT").volume.modality == "CT"
    with pytest.raises(SeriesError, match="no Modality and no modality hint"):
        load_series(paths)
    ct = write_datasets(_stack(phantom), tmp_path / "ct")
    with pytest.raises(SeriesError, match="has Modality CT, but MR was expected"):
        load_series(ct, modality_hint="MR")


def test_import_does_not_load_torch() -> None:
    """Importing dicom_node.imaging.loading pulls in no torch (the listener host has none)."""
    code = "import sys, dicom_node.imaging.loading; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
