"""DICOM SEG from a Prediction: valid (dciodvfy), pixel-exact on the source geometry (segread)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.demo import ChestSpec, Phantom, Sphere, make_chest_phantom
from dicom_node.results import ResultEncodingError, ResultOptions, encode_results
from dicom_node.results.seg import PALETTE, display_colors
from inference.prediction import Prediction, Segment
from tests.support import procs
from tests.support.result_examples import (
    NODULE_LABEL,
    enhanced_sources,
    example_series_info,
    phantom_prediction,
    single_frame_sources,
    volume_of,
)


def dcmqi_tool(name: str) -> str:
    """Path of a dcmqi command (PyPI ``dcmqi``, a test dependency, puts it beside the interpreter)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"dcmqi is a test dependency but {name} was not found: run `make test` to install it")
    return found


NODULES = (Sphere((-60.0, 10.0, 5.0), 20.0), Sphere((65.0, -15.0, -40.0), 12.0))
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """The small chest phantom with two nodules."""
    return make_chest_phantom(ChestSpec(nodules=NODULES))


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def masks_by_slice(
    seg: hd.seg.Segmentation,
    sources: list[Dataset],
    frame_refs: list[tuple[int, int]],
    shape: tuple[int, ...],
) -> dict[int, np.ndarray]:
    """Rebuild each segment's volume from the SEG frames via their per-frame source references."""
    slice_of = {
        (
            sources[i].SOPInstanceUID,
            f if int(getattr(sources[i], "NumberOfFrames", 1)) > 1 else None,
        ): k
        for k, (i, f) in enumerate(frame_refs)
    }
    out = {n: np.zeros(shape, dtype=bool) for n in seg.get_segment_numbers()}
    pixels = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        k = slice_of[(ref.ReferencedSOPInstanceUID, frame)]
        # With a single segment highdicom moves the identification to the shared groups.
        ident = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert not out[number][k].any(), f"slice {k} of segment {number} encoded twice"
        out[number][k] = pixels[f] > 0
    return out


def check_roundtrip(
    path: Path, prediction: Prediction, sources: list[Dataset], frame_refs: list[tuple[int, int]]
) -> hd.seg.Segmentation:
    seg = hd.seg.segread(path)
    in_seg = [s for s in prediction.segments if s.mask.any()]
    assert seg.get_segment_numbers() == list(range(1, len(in_seg) + 1))
    rebuilt = masks_by_slice(seg, sources, frame_refs, in_seg[0].mask.shape)
    for number, segment in enumerate(in_seg, start=1):
        np.testing.assert_array_equal(rebuilt[number], segment.mask, err_msg=segment.tracking_id)
    # Empty frames are omitted: one frame per (segment, slice) with at least one pixel.
    expected_frames = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in in_seg)
    assert seg.NumberOfFrames == expected_frames
    return seg


def test_ct_seg_is_valid_and_gives_back_the_exact_masks(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """A CT SEG passes dciodvfy with no error and segread gives back every mask on its slices."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    assert result.seg is not None
    path = write(result.seg, tmp_path / "seg.dcm")
    assert dciodvfy_clean(path) == []
    check_roundtrip(path, prediction, sources, refs)


def test_seg_header_describes_an_automatic_ai_result_aligned_with_the_source(
    phantom: Phantom, tmp_path: Path
) -> None:
    """The SEG keeps patient/study/frame of reference, is BINARY Explicit VR LE, codes segments."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    seg = hd.seg.segread(
        write(encode_results(prediction, volume_of(phantom), sources, refs).seg, tmp_path / "s.dcm")
    )
    src = sources[0]
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "AccessionNumber",
        "FrameOfReferenceUID",
    ):
        assert seg[keyword].value == src[keyword].value, keyword
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.SeriesNumber == 9901
    assert seg.SeriesDescription == "AI SEG ct-tissue 1.0.0"
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        float(v) for v in src.ImageOrientationPatient
    ]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [
        float(v) for v in src.PixelSpacing
    ]
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in sources
    }
    # Frames are sorted spatially along the slice normal (highdicom's order: monotonic z).
    z = [
        float(i.PlanePositionSequence[0].ImagePositionPatient[2])
        for i in seg.PerFrameFunctionalGroupsSequence
        if int(i.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == 1
    ]
    assert z in (sorted(z), sorted(z, reverse=True)) and len(set(z)) == len(z)
    # Labelled by tracking id: two nodules are "Nodule 1" and "Nodule 2", not twice "Nodule".
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Lungs", "Body", "Nodule 1", "Nodule 2"]
    # Every segment has its own recommended display colour (label colours first, then the
    # palette for the second nodule, whose label colour the first one took).
    lab = [tuple(d.RecommendedDisplayCIELabValue) for d in seg.SegmentSequence]
    assert len(set(lab)) == 4
    assert display_colors(prediction.segments) == [
        (128, 174, 128),
        (177, 122, 101),
        (255, 0, 0),
        PALETTE[0],
    ]
    for desc, segment in zip(seg.SegmentSequence, prediction.segments, strict=True):
        assert desc.SegmentAlgorithmType == "AUTOMATIC"
        algo = desc.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("ct-tissue", "1.0.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment.label.type.value
        assert desc.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert desc.TrackingID == segment.tracking_id
        assert desc.TrackingUID.startswith("2.25.")
    (equipment,) = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "dicom-node"]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert (
        equipment.Manufacturer,
        equipment.ManufacturerModelName,
        equipment.SoftwareVersions,
    ) == ("dicom-node", "ct-tissue", "1.0.0")
    assert equipment.DeviceSerialNumber == seg.DeviceUID


def test_mr_seg_is_valid_and_exact(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """An MR source gives a valid SEG with the exact masks."""
    sources, refs = single_frame_sources(phantom, example_series_info("MR"))
    prediction = phantom_prediction(phantom)
    path = write(
        encode_results(prediction, volume_of(phantom, "MR"), sources, refs).seg, tmp_path / "mr.dcm"
    )
    assert dciodvfy_clean(path) == []
    check_roundtrip(path, prediction, sources, refs)


def test_source_without_birth_date_or_sex_gives_valid_seg_with_empty_type2(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """Missing PatientBirthDate/PatientSex are written empty and the SEG stays valid."""
    info = example_series_info(patient_birth_date=None, patient_sex=None)
    sources, refs = single_frame_sources(phantom, info)
    assert "PatientBirthDate" not in sources[0]
    seg = encode_results(phantom_prediction(phantom), volume_of(phantom), sources, refs).seg
    path = write(seg, tmp_path / "seg.dcm")
    assert dciodvfy_clean(path) == []
    back = hd.seg.segread(path)
    assert back.PatientBirthDate == "" and back.PatientSex == ""


def test_enhanced_multiframe_source_gives_valid_seg_with_frame_references(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """An enhanced multi-frame CT source: valid SEG whose frames reference the right frames."""
    sources, refs = enhanced_sources(phantom)
    assert len(sources) == 1 and sources[0].NumberOfFrames == phantom.hu.shape[0]
    prediction = phantom_prediction(phantom)
    path = write(
        encode_results(prediction, volume_of(phantom), sources, refs).seg, tmp_path / "seg.dcm"
    )
    assert dciodvfy_clean(path) == []
    seg = check_roundtrip(path, prediction, sources, refs)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_sources_without_pixel_data_give_the_same_seg(phantom: Phantom) -> None:
    """highdicom needs only headers: sources read with stop_before_pixels give an identical SEG."""
    sources, refs = single_frame_sources(phantom)
    headers = [Dataset(ds) for ds in sources]
    for ds in headers:
        del ds.PixelData
    prediction = phantom_prediction(phantom)
    full = encode_results(prediction, volume_of(phantom), sources, refs).seg
    light = encode_results(prediction, volume_of(phantom), headers, refs).seg
    assert full is not None and light is not None
    assert light.PixelData == full.PixelData
    assert light.PerFrameFunctionalGroupsSequence == full.PerFrameFunctionalGroupsSequence


def test_empty_prediction_and_empty_masks_make_no_seg_segment(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """No segment -> no SEG; a segment with an empty mask is left out of it (SR still valid)."""
    sources, refs = single_frame_sources(phantom)
    empty = Prediction("ct-tissue", "1.0.0")
    assert encode_results(empty, volume_of(phantom), sources, refs).seg is None
    prediction = phantom_prediction(phantom)
    prediction.segments.append(
        Segment(NODULE_LABEL, np.zeros(phantom.hu.shape, dtype=bool), tracking_id="Nodule 9")
    )
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    assert result.seg is not None
    assert [d.TrackingID for d in result.seg.SegmentSequence] == [
        "Lungs",
        "Body",
        "Nodule 1",
        "Nodule 2",
    ]
    assert dciodvfy_clean(write(result.sr, tmp_path / "sr.dcm")) == []


def test_labelmap_option_refuses_overlapping_segments_and_encodes_disjoint_ones(
    phantom: Phantom, tmp_path: Path
) -> None:
    """LABELMAP encodes disjoint segments; overlapping ones are refused, the segment named."""
    sources, refs = single_frame_sources(phantom)
    options = ResultOptions(segmentation_type="LABELMAP")
    with pytest.raises(ResultEncodingError, match="'Body' overlaps another"):
        encode_results(phantom_prediction(phantom), volume_of(phantom), sources, refs, options)
    prediction = phantom_prediction(phantom, regions=("lungs",))
    lungs = prediction.segments[0]
    for nodule in prediction.segments[1:]:
        lungs.mask = lungs.mask & ~nodule.mask
    seg = encode_results(prediction, volume_of(phantom), sources, refs, options).seg
    assert seg is not None and seg.SegmentationType == "LABELMAP"
    back = hd.seg.segread(write(seg, tmp_path / "lm.dcm"))
    assert back.get_segment_numbers() == [1, 2, 3]


def test_inconsistent_inputs_are_refused_with_a_reason(phantom: Phantom) -> None:
    """Masks of the wrong shape or a volume off its source slices raise ResultEncodingError."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    volume = volume_of(phantom)
    with pytest.raises(ResultEncodingError, match="volume shape"):
        encode_results(prediction, volume, sources[:-1], refs[:-1])
    shifted = volume.affine.copy()
    shifted[2, 3] += 2.5
    with pytest.raises(ResultEncodingError, match="slice 0 of the volume is at"):
        encode_results(prediction, replace(volume, affine=shifted), sources, refs)
    prediction.segments[0].mask = prediction.segments[0].mask[:-1]
    with pytest.raises(ResultEncodingError, match="mask of segment 'Lungs' has shape"):
        encode_results(prediction, volume, sources, refs)
    with pytest.raises(ResultEncodingError, match="frame_refs points at source 99"):
        encode_results(prediction, volume, sources, [(99, 1), *refs[1:]])


def test_dcmqi_segimage2itkimage_reads_the_seg(phantom: Phantom, tmp_path: Path) -> None:
    """dcmqi's segimage2itkimage converts the SEG to one NRRD per segment, labels kept."""
    tool = dcmqi_tool("segimage2itkimage")
    sources, refs = single_frame_sources(phantom)
    seg = encode_results(phantom_prediction(phantom), volume_of(phantom), sources, refs).seg
    assert seg is not None
    path = write(seg, tmp_path / "seg.dcm")
    out = tmp_path / "itk"
    out.mkdir()
    res = procs.run_tool(
        [tool, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd"]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list(out.glob("*.nrrd"))) == 4
    meta = (out / "meta.json").read_text()
    assert '"SegmentLabel" : "Nodule 1"' in meta or '"SegmentLabel": "Nodule 1"' in meta
