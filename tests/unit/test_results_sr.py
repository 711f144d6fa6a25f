"""TID 1500 Comprehensive 3D SR from a Prediction: valid (dciodvfy, dsrdump), complete (srread)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.demo import ChestSpec, Phantom, Sphere, make_chest_phantom
from dicom_node.results import EncodedResults, ResultOptions, encode_results
from dicom_node.results.sr import mask_volume_ml, outline_diameter_mm
from inference.prediction import Prediction
from tests.conftest import require_tool
from tests.support import procs
from tests.support.result_examples import (
    enhanced_sources,
    example_series_info,
    phantom_prediction,
    single_frame_sources,
    volume_of,
)

NODULES = (Sphere((-60.0, 10.0, 5.0), 20.0), Sphere((65.0, -15.0, -40.0), 12.0))
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """The small chest phantom with two nodules."""
    return make_chest_phantom(ChestSpec(nodules=NODULES))


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dsrdump(path: Path) -> str:
    """dsrdump's rendering of ``path``; fails on any warning or error on stderr."""
    require_tool("dsrdump")
    res = procs.run_tool(["dsrdump", str(path)])
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    return res.stdout


def encode(
    phantom: Phantom, modality: str = "CT", **info: object
) -> tuple[EncodedResults, Prediction]:
    sources, refs = single_frame_sources(phantom, example_series_info(modality, **info))
    prediction = phantom_prediction(
        phantom, notes=("Synthetic phantom: ground truth as prediction.",)
    )
    return encode_results(prediction, volume_of(phantom, modality), sources, refs), prediction


def segment_tracking_uids(seg: Dataset) -> dict[int, str]:
    return {int(d.SegmentNumber): str(d.TrackingUID) for d in seg.SegmentSequence}


@pytest.mark.parametrize(
    ("modality", "info"),
    [
        ("CT", {}),
        ("MR", {}),
        ("CT", {"patient_birth_date": None, "patient_sex": None}),
    ],
)
def test_sr_is_valid_for_ct_mr_and_sparse_patient_data(
    phantom: Phantom,
    tmp_path: Path,
    dciodvfy_clean: Callable[[Path], list[str]],
    modality: str,
    info: dict[str, object],
) -> None:
    """The SR passes dciodvfy with no error or warning; dsrdump shows its Measurement Report."""
    result, _ = encode(phantom, modality, **info)
    path = write(result.sr, tmp_path / "sr.dcm")
    assert dciodvfy_clean(path) == []
    text = dsrdump(path)
    assert '"Imaging Measurement Report"' in text
    assert "Verification Flag   : UNVERIFIED" in text and "Completion Flag     : COMPLETE" in text


def test_sr_header_is_an_unverified_complete_ai_result_of_the_source_study(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Same study and patient, new series 9902 named for the model, device = the model version."""
    result, _ = encode(phantom, patient_birth_date=None)
    assert result.seg is not None
    sr = hd.sr.srread(write(result.sr, tmp_path / "sr.dcm"))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == result.seg.StudyInstanceUID
    assert (sr.PatientID, sr.PatientBirthDate) == ("PHANTOM-001", "")
    assert sr.SeriesNumber == 9902 and sr.SeriesDescription == "AI SR ct-tissue 1.0.0"
    assert sr.SeriesInstanceUID not in (
        result.seg.SeriesInstanceUID,
        result.seg.ReferencedSeriesSequence[0].SeriesInstanceUID,
    )
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert sr.DeviceUID == result.seg.DeviceUID
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "dicom-node"]
    assert (equipment.ManufacturerModelName, equipment.SoftwareVersions) == ("ct-tissue", "1.0.0")
    evidence = {
        r.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert result.seg.SOPInstanceUID in evidence and len(evidence) == phantom.hu.shape[0] + 1


def test_srread_gives_back_every_group_value_unit_and_the_seg_tracking_uids(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Volumetric groups reference their SEG segment and TrackingUID and carry every measurement."""
    result, prediction = encode(phantom)
    assert result.seg is not None
    tracking = segment_tracking_uids(result.seg)
    report = hd.sr.srread(write(result.sr, tmp_path / "sr.dcm")).content
    assert report[0].ConceptNameCodeSequence[0].CodeValue == "126000"
    procedure = [i for i in report[0].ContentSequence if i.name.value == "121058"]
    assert [p.value.value for p in procedure] == ["169069000"]
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == len(prediction.segments) == 4
    for number, (group, segment) in enumerate(
        zip(volumetric, prediction.segments, strict=True), start=1
    ):
        assert group.tracking_identifier == segment.tracking_id
        assert group.tracking_uid == tracking[number]
        assert group.referenced_segment.referenced_segment_numbers == [number]
        assert group.referenced_segment.referenced_sop_instance_uid == result.seg.SOPInstanceUID
        assert group.finding_type.value == segment.label.type.value
        algorithm = {
            i.name.value: i.value
            for i in group[0].ContentSequence
            if i.name.value in ("111001", "111003")
        }
        assert algorithm == {"111001": "ct-tissue", "111003": "1.0.0"}  # TID 4019 name, version
        got = {(m.name.value, m.unit.value): m.value for m in group.get_measurements()}
        # Volume is counted from the SEG mask; a lesion's diameter goes with its outline.
        want = {
            (m.name.value, m.unit.value): m.value
            for m in segment.measurements
            if m.name.value != "81827009"
        }
        want[("118565006", "ml")] = mask_volume_ml(segment, volume_of(phantom))
        if segment.confidence is not None:
            want[("111012", "%")] = 100.0 * segment.confidence
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), key
        # ... and agrees with the model's own count of the mask to its rounding.
        model_ml = next(m.value for m in segment.measurements if m.name.value == "118565006")
        assert got[("118565006", "ml")] == pytest.approx(model_ml, abs=1e-3)
    # Every group, planar ones included, carries a TrackingUID of a SEG segment.
    all_groups = [*volumetric, *report.get_planar_roi_measurement_groups()]
    assert {g.tracking_uid for g in all_groups} == set(tracking.values())


def test_every_lesion_has_a_key_slice_outline_and_a_centre_point(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Per lesion: a SCOORD POLYLINE on its key slice's image and a SCOORD3D POINT at its centre."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    report = hd.sr.srread(write(result.sr, tmp_path / "sr.dcm")).content
    volumetric = report.get_volumetric_roi_measurement_groups()
    lesions = [(i, s) for i, s in enumerate(prediction.segments) if s.confidence is not None]
    assert len(lesions) == 2
    volume = volume_of(phantom)
    for i, lesion in lesions:
        groups = report.get_planar_roi_measurement_groups(tracking_uid=volumetric[i].tracking_uid)
        outline = [g for g in groups if isinstance(g.roi, hd.sr.ImageRegion)]
        centre = [g for g in groups if isinstance(g.roi, hd.sr.ImageRegion3D)]
        assert len(outline) == 1 and len(centre) == 1
        # The diameter is measured on the outline: its longest chord.
        (diameter,) = outline[0].get_measurements()
        assert diameter.name.value == "81827009" and diameter.unit.value == "mm"
        assert diameter.value == pytest.approx(outline_diameter_mm(lesion.outline), abs=0.01)
        chords = np.linalg.norm(lesion.outline[:, None] - lesion.outline[None], axis=-1)
        assert diameter.value == pytest.approx(chords.max(), abs=0.01)
        region = outline[0].roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert lesion.key_slice is not None and lesion.outline is not None
        image = sources[lesion.key_slice]
        assert (
            region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == image.SOPInstanceUID
        )
        xy = region.value
        np.testing.assert_allclose(xy[0], xy[-1])  # closed
        # Back to LPS through the source geometry: the outline as given, on the key slice.
        index = np.stack(
            [np.full(len(xy), lesion.key_slice), xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1
        )
        np.testing.assert_allclose(volume.index_to_patient(index), lesion.outline, atol=1e-3)
        point = centre[0].roi
        assert point.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        np.testing.assert_allclose(point.value.reshape(3), lesion.centre, atol=1e-4)
        assert point.frame_of_reference_uid == image.FrameOfReferenceUID
        purpose = [i for i in centre[0][0].ContentSequence if i.name.value == "130400"]
        assert purpose[0].value.value == "111010"


def test_multiframe_source_sr_is_valid_and_outlines_reference_frames(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """With an enhanced multi-frame source the outline references the key slice's frame number."""
    sources, refs = enhanced_sources(phantom)
    prediction = phantom_prediction(phantom)
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    path = write(result.sr, tmp_path / "sr.dcm")
    assert dciodvfy_clean(path) == []
    assert '"Imaging Measurement Report"' in dsrdump(path)
    report = hd.sr.srread(path).content
    lesion = prediction.segments[2]
    assert lesion.key_slice is not None
    outline = [
        g
        for g in report.get_planar_roi_measurement_groups()
        if isinstance(g.roi, hd.sr.ImageRegion) and g.tracking_identifier == lesion.tracking_id
    ]
    ref = outline[0].roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    assert int(ref.ReferencedFrameNumber) == refs[lesion.key_slice][1]


def test_image_library_lists_every_source_image(phantom: Phantom, tmp_path: Path) -> None:
    """The Image Library (TID 1600): one group, shared descriptors, an entry per source image."""
    result, _ = encode(phantom)
    text = dsrdump(write(result.sr, tmp_path / "sr.dcm"))
    library = text[text.index('"Image Library"') : text.index('"Imaging Measurements"')]
    assert library.count('IMAGE:(,,"Source")') == phantom.hu.shape[0]
    assert library.count('"Frame of Reference UID"') == 1 and '"Modality")=(CT' in library


def test_empty_prediction_gives_sr_only_saying_nothing_was_found(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """No segment: no SEG; the SR has one 'No finding' group (Presence of property: Absent)
    framing the middle image, and the absence and notes in the report's evaluations."""
    sources, refs = single_frame_sources(phantom)
    empty = Prediction("nodule-detector", "2.1.0", notes=["no nodule >= 4 mm found"])
    result = encode_results(empty, volume_of(phantom), sources, refs)
    assert result.seg is None
    path = write(result.sr, tmp_path / "sr.dcm")
    assert dciodvfy_clean(path) == []
    text = dsrdump(path)
    assert '"Presence of property")=(121054,DCM,"Absent")' in text
    assert '"no nodule >= 4 mm found"' in text
    report = hd.sr.srread(path).content
    container = next(i for i in report[0].ContentSequence if i.name.value == "C0034375")
    items = container.ContentSequence
    assert (items[0].name.value, items[0].value.value) == ("121052", "121054")
    assert [n.value for n in items[1:]] == [
        "No finding reported by nodule-detector 2.1.0.",
        "no nodule >= 4 mm found",
    ]
    (group,) = report.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "No finding"
    evaluations = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
    assert ("121052", "121054") in evaluations
    # Its image region: a frame through the centres of the middle source image's edge pixels.
    middle = sources[len(sources) // 2]
    region = group.roi
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        middle.SOPInstanceUID
    )
    xy = region.value
    assert (xy[:, 0].min(), xy[:, 0].max()) == (0.5, middle.Columns - 0.5)
    assert (xy[:, 1].min(), xy[:, 1].max()) == (0.5, middle.Rows - 0.5)
    assert len(xy) == 9 and np.allclose(xy[0], xy[-1])


def test_a_segment_with_an_empty_mask_is_reported_absent_not_as_a_group(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """A finding type not found becomes '<type> = Absent' in the report's evaluations; every
    measurement group of the report has an image region (what OHIF needs)."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    nodule = prediction.segments[2]
    prediction.segments[3] = replace(
        prediction.segments[3], mask=np.zeros_like(nodule.mask), tracking_id="Nodule 9"
    )
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    path = write(result.sr, tmp_path / "sr.dcm")
    assert dciodvfy_clean(path) == []
    report = hd.sr.srread(path).content
    container = next(i for i in report[0].ContentSequence if i.name.value == "C0034375")
    assert [(i.name.value, i.value.value) for i in container.ContentSequence] == [
        ("27925004", "121054")
    ]
    assert report.get_image_measurement_groups() == []
    tracking = {g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups()}
    assert tracking == {"Lungs", "Body", "Nodule 1"}
    # Each tracking UID has a planar group with a 2D image region.
    planar = report.get_planar_roi_measurement_groups()
    with_region = {g.tracking_identifier for g in planar if isinstance(g.roi, hd.sr.ImageRegion)}
    assert with_region == tracking


def test_regions_are_outlined_on_the_slice_where_they_are_largest(
    phantom: Phantom, tmp_path: Path
) -> None:
    """A region's outline lies on the boundary of its largest part on its largest slice."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    report = hd.sr.srread(write(result.sr, tmp_path / "sr.dcm")).content
    for segment in prediction.segments[:2]:
        (group,) = [
            g
            for g in report.get_planar_roi_measurement_groups()
            if g.tracking_identifier == segment.tracking_id
        ]
        k = int(np.argmax(segment.mask.sum(axis=(1, 2))))
        ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == sources[k].SOPInstanceUID
        xy = group.roi.value
        np.testing.assert_allclose(xy[0], xy[-1])
        # Every vertex is within half a pixel of a boundary between mask and background.
        plane = np.pad(segment.mask[k], 1)
        for x, y in xy:
            r, c = y - 0.5 + 1, x - 0.5 + 1  # back to padded pixel-centre indices
            around = plane[
                int(np.floor(r)) : int(np.floor(r)) + 2, int(np.floor(c)) : int(np.floor(c)) + 2
            ]
            assert around.any() and not around.all(), (segment.tracking_id, x, y)


def test_nodule_finding_site_is_the_lung_on_the_side_of_its_centre(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Nodules left of the body midline (LPS +x) are in the left lung, the others in the right."""
    sources, refs = single_frame_sources(phantom)
    prediction = phantom_prediction(phantom)
    result = encode_results(prediction, volume_of(phantom), sources, refs)
    text = dsrdump(write(result.sr, tmp_path / "sr.dcm"))
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    for segment, expected in zip(prediction.segments[2:], ("24028007", "7771000"), strict=True):
        assert segment.centre is not None
        # The phantom is centred on x = 0: NODULES[0] at x = -60 (right), NODULES[1] at +65.
        assert (segment.centre[0] > 0) == (expected == "7771000")
        for group in report.get_volumetric_roi_measurement_groups(
            tracking_uid=next(
                g.tracking_uid
                for g in report.get_volumetric_roi_measurement_groups()
                if g.tracking_identifier == segment.tracking_id
            )
        ):
            (site,) = group.finding_sites
            assert site.value.value == "39607008"  # Lung
            (laterality,) = site.ContentSequence
            assert laterality.value.value == expected
    assert '"Laterality")=(24028007,SCT,"Right")' in text
    assert '"Laterality")=(7771000,SCT,"Left")' in text
    # Regions get no finding site.
    lungs = next(
        g for g in report.get_volumetric_roi_measurement_groups() if g.tracking_identifier == "Lungs"
    )
    assert lungs.finding_sites == []


def test_procedure_reported_follows_modality_and_body_part(
    phantom: Phantom, tmp_path: Path
) -> None:
    """Procedure Reported is the imaging procedure (CT chest, MRI), never the algorithm."""
    for modality, info, code in (
        ("CT", {}, "169069000"),
        ("CT", {"body_part": "ABDOMEN"}, "25045-6"),
        ("MR", {}, "25056-3"),
    ):
        result, _ = encode(phantom, modality, **info)
        report = hd.sr.srread(write(result.sr, tmp_path / "sr.dcm")).content
        (procedure,) = [i for i in report[0].ContentSequence if i.name.value == "121058"]
        assert procedure.value.value == code, (modality, info)


def test_uids_are_deterministic_and_change_with_the_model_version(phantom: Phantom) -> None:
    """Encoding twice gives the same UIDs; another model version gives new ones, Device UID too."""
    sources, refs = single_frame_sources(phantom)

    def uids(version: str) -> list[str]:
        result = encode_results(
            phantom_prediction(phantom, model_version=version), volume_of(phantom), sources, refs
        )
        assert result.seg is not None
        return [
            result.seg.SeriesInstanceUID,
            result.seg.SOPInstanceUID,
            result.sr.SeriesInstanceUID,
            result.sr.SOPInstanceUID,
            result.seg.DeviceUID,
            *segment_tracking_uids(result.seg).values(),
        ]

    first, again, other = uids("1.0.0"), uids("1.0.0"), uids("1.0.1")
    assert first == again
    assert len(set(first)) == len(first)
    assert not set(first) & set(other)


def test_options_set_series_numbers_and_manufacturer(phantom: Phantom) -> None:
    """ResultOptions series numbers and manufacturer reach both objects."""
    sources, refs = single_frame_sources(phantom)
    options = ResultOptions(seg_series_number=77, sr_series_number=78, manufacturer="Hospital AI")
    result = encode_results(phantom_prediction(phantom), volume_of(phantom), sources, refs, options)
    assert result.seg is not None
    assert (result.seg.SeriesNumber, result.sr.SeriesNumber) == (77, 78)
    assert result.seg.Manufacturer == result.sr.Manufacturer == "Hospital AI"


def test_dcmqi_tid1500reader_reads_the_sr(phantom: Phantom, tmp_path: Path) -> None:
    """dcmqi's tid1500reader parses the SR into JSON with every measurement group."""
    from tests.unit.test_results_seg import dcmqi_tool

    found = dcmqi_tool("tid1500reader")
    result, prediction = encode(phantom)
    path = write(result.sr, tmp_path / "sr.dcm")
    out = tmp_path / "sr.json"
    res = procs.run_tool([found, "--inputDICOM", str(path), "--outputMetadata", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr

    meta = json.loads(out.read_text())
    groups = meta["Measurements"]
    assert len(groups) >= len(prediction.segments)
    assert {g["TrackingIdentifier"] for g in groups} >= {s.tracking_id for s in prediction.segments}
