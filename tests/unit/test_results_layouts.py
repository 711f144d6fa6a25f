"""SEG + SR of enhanced CT and MR in every functional-group layout, straight and tilted.

Each series goes through the real loader and both encoders; the SEG and SR pass dciodvfy, read
back with highdicom, and every mask lands on the source frame of its slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_node.demo import ChestSpec, Phantom, Sphere, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.imaging.loading import LoadedSeries, load_series
from dicom_node.results import ResultEncodingError, encode_results
from inference.prediction import Prediction, Segment
from tests.support import procs, quirks
from tests.support.result_examples import BODY_LABEL, NODULE_LABEL, phantom_prediction
from tests.unit.test_results_seg import check_roundtrip, dcmqi_tool

NODULES = (Sphere((-60.0, 10.0, 5.0), 20.0),)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """A 24-slice chest phantom with one nodule."""
    return make_chest_phantom(ChestSpec(slices=24, nodules=NODULES))


def _tilted(phantom: Phantom, tilt_deg: float) -> Phantom:
    if tilt_deg == 0.0:
        return phantom
    dz, dy, _ = phantom.spacing
    affine = quirks.tilted_affine(phantom.hu.shape, dy, dz, tilt_deg)
    affine[:3, 3] = phantom.affine[:3, 3]
    return dataclasses.replace(phantom, affine=affine)


def _enhanced_series(phantom: Phantom, modality: str, layout: str, seed: str, tmp: Path) -> LoadedSeries:
    info = quirks.series_info(seed, modality=modality)
    enhanced = quirks.enhanced(slice_datasets(phantom.hu, phantom.affine, info), seed)
    quirks.functional_group_layout(enhanced, layout)
    return load_series(write_datasets([enhanced], tmp / seed))


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("tilt_deg", [0.0, 15.0], ids=["straight", "tilted"])
@pytest.mark.parametrize("layout", sorted(quirks.GROUP_LAYOUTS))
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_source_in_every_layout_gives_valid_seg_and_sr(
    phantom: Phantom,
    modality: str,
    layout: str,
    tilt_deg: float,
    tmp_path: Path,
    dciodvfy_clean: Callable[[Path], list[str]],
) -> None:
    """Pixel Measures / Plane Orientation shared, per frame or mixed: SEG and SR valid, masks exact."""
    source = _tilted(phantom, tilt_deg)
    loaded = _enhanced_series(source, modality, layout, f"layout-{modality}-{layout}-{tilt_deg:g}", tmp_path)
    shared = loaded.sources[0].SharedFunctionalGroupsSequence[0]
    per_frame = loaded.sources[0].PerFrameFunctionalGroupsSequence[0]
    assert ("PixelMeasuresSequence" in per_frame) == (layout != "shared")
    assert ("PlaneOrientationSequence" in shared) == (layout != "per-frame")
    np.testing.assert_allclose(loaded.volume.affine, source.affine, atol=1e-3)

    prediction = phantom_prediction(source)
    result = encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs)
    assert result.seg is not None
    seg_path = _write(result.seg, tmp_path / "seg.dcm")
    sr_path = _write(result.sr, tmp_path / "sr.dcm")
    dciodvfy_clean(seg_path)
    dciodvfy_clean(sr_path)
    seg = check_roundtrip(seg_path, prediction, loaded.sources, loaded.frame_refs)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], source.spacing[1:], atol=1e-4)
    # The step along the slice normal: 5 mm straight, 5 cos(15 deg) mm tilted.
    normal_step = source.spacing[0] * np.cos(np.radians(tilt_deg))
    assert float(measures.SpacingBetweenSlices) == pytest.approx(normal_step, abs=1e-3)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in orientation.ImageOrientationPatient],
        np.concatenate([source.affine[:3, 2], source.affine[:3, 1]]) / source.spacing[1],
        atol=1e-5,
    )
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert {g.tracking_identifier for g in groups} == {s.tracking_id for s in prediction.segments}


def test_single_frame_orientation_rounding_is_encoded(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """Slices whose ImageOrientationPatient differ by 1e-6 (scanner rounding) give a valid SEG."""
    info = quirks.series_info("iop-rounding")
    datasets = slice_datasets(phantom.hu, phantom.affine, info)
    for k, ds in enumerate(datasets):
        iop = [float(v) for v in ds.ImageOrientationPatient]
        iop[0] -= 1e-6 * (k % 2)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    loaded = load_series(write_datasets(datasets, tmp_path / "ct"))
    prediction = phantom_prediction(phantom)
    seg = encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs).seg
    assert seg is not None
    path = _write(seg, tmp_path / "seg.dcm")
    dciodvfy_clean(path)
    check_roundtrip(path, prediction, loaded.sources, loaded.frame_refs)


def test_frames_without_a_common_pixel_spacing_are_refused_naming_the_group(
    phantom: Phantom, tmp_path: Path
) -> None:
    """An enhanced source whose used frames disagree in Pixel Measures is refused by keyword."""
    loaded = _enhanced_series(phantom, "MR", "per-frame", "layout-disagree", tmp_path)
    item = loaded.sources[0].PerFrameFunctionalGroupsSequence[3].PixelMeasuresSequence[0]
    item.PixelSpacing = [float(v) * 1.5 for v in item.PixelSpacing]
    mask = np.zeros(loaded.volume.shape, dtype=bool)
    mask[2:5, 10:20, 10:20] = True
    prediction = Prediction("m", "1", [Segment(NODULE_LABEL, mask, tracking_id="Nodule 1")])
    with pytest.raises(ResultEncodingError, match="source frames differ in PixelMeasuresSequence"):
        encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs)


@pytest.mark.parametrize("source", ["single-frame", "enhanced per-frame"])
def test_dcmqi_rebuilds_the_exact_volume(phantom: Phantom, tmp_path: Path, source: str) -> None:
    """dcmqi turns the SEG into an NRRD on the source grid, voxel for voxel: 7 mm thick slices
    every 5 mm as single frames, and an enhanced MR with its geometry only per frame."""
    seed = f"dcmqi-{source.replace(' ', '-')}"
    if source == "single-frame":
        datasets = slice_datasets(phantom.hu, phantom.affine, quirks.series_info(seed))
        for ds in datasets:
            ds.SliceThickness = "7"
        loaded = load_series(write_datasets(datasets, tmp_path / "ct"))
    else:
        loaded = _enhanced_series(phantom, "MR", "per-frame", seed, tmp_path)
    body = phantom.masks["body"]
    prediction = Prediction("m", "1", [Segment(BODY_LABEL, body)])
    seg = encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs).seg
    assert seg is not None
    path = _write(seg, tmp_path / "seg.dcm")
    out = tmp_path / "nrrd"
    out.mkdir()
    res = procs.run_tool([dcmqi_tool("segimage2itkimage"), "--inputDICOM", str(path),
                          "--outputDirectory", str(out), "-t", "nrrd"])
    assert res.returncode == 0 and "ERROR" not in res.stdout + res.stderr, res.stdout + res.stderr
    image = sitk.ReadImage(str(out / "1.nrrd"))
    np.testing.assert_allclose(image.GetSpacing(), phantom.spacing[::-1], atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), phantom.affine[:3, 3], atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image) > 0, body)
