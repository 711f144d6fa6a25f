"""GSPS, KOS, secondary capture and the output registry: valid (dciodvfy), applied by DCMTK,
references resolvable, banner burned in."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from dicom_node.demo import ChestSpec, Phantom, Sphere, make_chest_phantom
from dicom_node.results import ResultOptions, encode_outputs
from dicom_node.results import registry as reg
from dicom_node.results.common import SERIES_OFFSETS, model_series_numbers, series_slot
from dicom_node.results.drawing import LUNG_WINDOW
from dicom_node.results.sc import BANNER_COLOR, BANNER_HEIGHT, banner_text, draw_text
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
ALL = ("seg", "sr", "gsps", "kos", "sc")
Encoded = tuple[dict[str, list[Dataset]], list[Dataset], Prediction]


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """The small chest phantom with two nodules."""
    return make_chest_phantom(ChestSpec(nodules=NODULES))


def encode_all(phantom: Phantom, modality: str = "CT", model: str = "ct-tissue") -> Encoded:
    sources, refs = single_frame_sources(phantom, example_series_info(modality))
    prediction = phantom_prediction(phantom, model_name=model)
    results = encode_outputs(prediction, volume_of(phantom, modality), sources, refs, ALL)
    return results, sources, prediction


@pytest.fixture(scope="module")
def ct(phantom: Phantom) -> Encoded:
    """Every output type of the phantom's truth as a CT prediction."""
    return encode_all(phantom)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_registry_names_order_and_needs() -> None:
    """The six output types are registered in encoding order; the defaults are all but the
    opt-in ``seg-resampled``; an SR pulls its SEG in; a KOS comes after everything it
    references; unknown names are refused with the known ones."""
    assert reg.output_names() == ["seg", "sr", "seg-resampled", "gsps", "sc", "kos"]
    assert set(reg.DEFAULT_OUTPUTS) == set(reg.output_names()) - {"seg-resampled"}
    assert reg.closure(["sr"]) == ["seg", "sr"]
    assert reg.closure(["kos", "gsps"]) == ["gsps", "kos"]
    with pytest.raises(KeyError, match="unknown output type 'pdf'; known: seg, sr"):
        reg.closure(["pdf"])
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(reg.OutputType("seg", lambda ctx: [], (), "again"))


def test_every_output_type_is_valid_for_ct_and_mr(
    phantom: Phantom, ct: Encoded, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """SEG, SR, GSPS, KOS and each SC pass dciodvfy -new with no error, for CT and MR."""
    mr, _, _ = encode_all(phantom, "MR")
    for label, results in (("ct", ct[0]), ("mr", mr)):
        assert [n for n in results if results[n]] == ["seg", "sr", "gsps", "sc", "kos"]
        for name, datasets in results.items():
            for i, ds in enumerate(datasets):
                dciodvfy_clean(save(ds, tmp_path / f"{label}-{name}-{i}.dcm"))


def test_uids_are_derived_per_output_type_and_stable(phantom: Phantom, ct: Encoded) -> None:
    """Encoding again gives the same UIDs; each output type has its own series and instances."""
    again, _, _ = encode_all(phantom)
    first = {n: [d.SOPInstanceUID for d in ds] for n, ds in ct[0].items()}
    assert first == {n: [d.SOPInstanceUID for d in ds] for n, ds in again.items()}
    series = {n: ds[0].SeriesInstanceUID for n, ds in ct[0].items()}
    assert len(set(series.values())) == 5
    numbers = {n: int(ds[0].SeriesNumber) for n, ds in ct[0].items()}
    assert numbers == {"seg": 9901, "sr": 9902, "gsps": 9903, "sc": 9905, "kos": 9904}


def test_each_model_gets_its_own_series_numbers(phantom: Phantom) -> None:
    """With per-model blocks no two models of one study share a Series Number; the built-in
    models' hashed slots do not collide."""
    assert len({series_slot(n) for n in ("ct-tissue", "ct-lung-nodules", "foreground")}) == 3
    sources, refs = single_frame_sources(phantom)
    numbers = []
    for model in ("ct-tissue", "ct-lung-nodules"):
        options = ResultOptions(series_numbers=model_series_numbers(9000, series_slot(model)))
        results = encode_outputs(phantom_prediction(phantom, model_name=model), volume_of(phantom),
                                 sources, refs, ALL, options)
        numbers.append({int(d.SeriesNumber) for ds in results.values() for d in ds})
    assert len(numbers[0]) == len(numbers[1]) == 5 and not numbers[0] & numbers[1]
    assert model_series_numbers(9000, 74) == {
        k: 9740 + v for k, v in SERIES_OFFSETS.items()
    }


# ---------------------------------------------------------------- GSPS


def dcmp2pgm(gsps: Path, image: Path, out: Path) -> tuple[np.ndarray, str]:
    """DCMTK's rendering of ``image`` through ``gsps`` (PGM pixels) and its dump of the state."""
    require_tool("dcmp2pgm")
    res = procs.run_tool(["dcmp2pgm", "-v", "-p", str(gsps), str(image), str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    return np.asarray(Image.open(out)), res.stdout + res.stderr


def test_gsps_is_applied_by_dcmtk_with_its_window_and_the_key_image_graphics(
    phantom: Phantom, ct: Encoded, tmp_path: Path
) -> None:
    """dcmp2pgm applies the GSPS to a nodule's key image: the pixels follow the lung window
    (not the image's own), and DCMTK lists, for that image only, the nodule's outline on its
    edge, its centre and the measurement text."""
    results, sources, prediction = ct
    gsps = save(results["gsps"][0], tmp_path / "gsps.dcm")
    nodule = next(s for s in prediction.segments if s.tracking_id == "Nodule 1")
    k = int(nodule.key_slice)  # type: ignore[arg-type]
    image = save(sources[k], tmp_path / "key.dcm")
    rendered, dump = dcmp2pgm(gsps, image, tmp_path / "key.pgm")
    plain, _ = dcmp2pgm_plain(image, tmp_path / "plain.pgm")
    assert rendered.shape == phantom.hu.shape[1:]
    # DCMTK's linear window (PS3.3 C.11.2.1.2) over the stored HU of the phantom.
    c, w = LUNG_WINDOW.center, LUNG_WINDOW.width
    hu = np.round(phantom.hu[k] + 1024.0) - 1024.0
    expected = np.clip(((hu - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0, 255)
    assert float(np.abs(rendered.astype(float) - expected).max()) <= 1.5
    assert not np.array_equal(rendered, plain)
    assert "Nodule 1: 20.0 mm" in dump and "confidence 90 %" in dump
    assert "Nodule 2" not in dump  # drawn on its own key image only
    polyline = re.search(r"type=polyline.*?coordinates: ([-\d.\\, ]+)", dump, re.S)
    assert polyline is not None and "type=point" in dump
    values = [float(v) for v in re.split(r"[\\, ]+", polyline.group(1).strip(", ")) if v]
    xy = np.array(values).reshape(-1, 2)
    # The outline runs on the nodule's edge on its key slice (radius in pixels, +/- 1 px).
    rows, cols = np.nonzero(nodule.mask[k])
    centre = np.array([cols.mean() + 0.5, rows.mean() + 0.5])
    radius = np.sqrt(nodule.mask[k].sum() / np.pi)
    assert np.abs(np.linalg.norm(xy - centre, axis=1) - radius).max() <= 1.0


def dcmp2pgm_plain(image: Path, out: Path) -> tuple[np.ndarray, str]:
    res = procs.run_tool(["dcmp2pgm", str(image), str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    return np.asarray(Image.open(out)), res.stdout


def test_gsps_references_the_series_and_draws_regions_on_a_few_slices(ct: Encoded) -> None:
    """The GSPS references every source image, one layer named for the model, tracking UIDs
    shared with the SEG, region contours on at most three slices each."""
    results, sources, _ = ct
    gsps, seg = results["gsps"][0], results["seg"][0]
    referenced = {
        r.ReferencedSOPInstanceUID
        for s in gsps.ReferencedSeriesSequence for r in s.ReferencedImageSequence
    }
    assert referenced == {s.SOPInstanceUID for s in sources}
    assert [g.GraphicLayer for g in gsps.GraphicLayerSequence] == ["AI CT_TISSUE"]
    tracking = {str(g.TrackingUID): str(g.TrackingID)
                for a in gsps.GraphicAnnotationSequence for g in a.get("GraphicObjectSequence", [])}
    assert tracking == {str(d.TrackingUID): str(d.TrackingID) for d in seg.SegmentSequence}
    texts = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence
             for t in a.get("TextObjectSequence", [])]
    assert sum(t.startswith("Lungs:") for t in texts) <= 3 and sum(t.startswith("Body:") for t in texts) <= 3
    assert gsps.SoftcopyVOILUTSequence[0].WindowCenterWidthExplanation == "LUNG"


def test_gsps_of_an_enhanced_source_names_frames(phantom: Phantom, tmp_path: Path,
                                                 dciodvfy_clean: Callable[[Path], list[str]]) -> None:
    """For one multi-frame source every annotation names the frame it is drawn on."""
    sources, refs = enhanced_sources(phantom)
    results = encode_outputs(phantom_prediction(phantom), volume_of(phantom), sources, refs, ("gsps",))
    gsps = results["gsps"][0]
    frames = [int(r.ReferencedFrameNumber) for a in gsps.GraphicAnnotationSequence
              for r in a.ReferencedImageSequence]
    assert frames and all(1 <= f <= phantom.hu.shape[0] for f in frames)
    dciodvfy_clean(save(gsps, tmp_path / "gsps.dcm"))


# ---------------------------------------------------------------- KOS


def referenced_uids(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds``."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    return found


def test_kos_flags_key_images_and_references_every_result(ct: Encoded, tmp_path: Path) -> None:
    """The KOS ("Of Interest") lists each finding's key image and the SEG, SR, GSPS and SCs;
    every UID it references is a source image or a result of the same job."""
    results, sources, prediction = ct
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(
        pydicom.dcmread(save(results["kos"][0], tmp_path / "kos.dcm"))
    )
    root = kos.ContentSequence
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"
    known = {s.SOPInstanceUID for s in sources} | {
        d.SOPInstanceUID for n in ("seg", "sr", "gsps", "sc") for d in results[n]
    }
    assert referenced_uids(kos) <= known
    items = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
             for i in root if "ReferencedSOPSequence" in i}
    keys = {sources[int(s.key_slice)].SOPInstanceUID  # type: ignore[arg-type]
            for s in prediction.segments if s.key_slice is not None}
    results_uids = {d.SOPInstanceUID for n in ("seg", "sr", "gsps", "sc") for d in results[n]}
    assert items == keys | results_uids
    description = next(i.TextValue for i in root
                       if i.ConceptNameCodeSequence[0].CodeValue == "113012")  # Key Object Description
    assert "Nodule 1: 20.0 mm" in description and "2 finding(s)" in description


# ---------------------------------------------------------------- SC


def banner_band(prediction: Prediction, width: int) -> np.ndarray:
    """The banner as Pillow draws it on a black band of ``width``."""
    band = Image.new("RGB", (width, BANNER_HEIGHT))
    draw_text(ImageDraw.Draw(band), (6, (BANNER_HEIGHT - 15) // 2 - 1), banner_text(prediction),
              BANNER_COLOR)
    return np.asarray(band)


def test_secondary_captures_carry_the_banner_and_the_source_identity(
    phantom: Phantom, ct: Encoded, tmp_path: Path
) -> None:
    """One RGB SC per finding's key slice, read back from file: the banner's pixels are the
    banner text, burned-in annotation YES, same patient and study, pixel spacing of the key
    slice divided by the enlargement, and the nodule's outline drawn in its colour."""
    results, sources, prediction = ct
    scs = [pydicom.dcmread(save(d, tmp_path / f"sc{i}.dcm")) for i, d in enumerate(results["sc"])]
    assert len(scs) == 2
    for sc in scs:
        pixels = sc.pixel_array
        assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
        assert np.array_equal(pixels[:BANNER_HEIGHT], banner_band(prediction, pixels.shape[1]))
        yellow = np.all(pixels[:BANNER_HEIGHT] == BANNER_COLOR, axis=-1).sum()
        assert yellow > 300
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
            assert sc[keyword].value == sources[0][keyword].value
        scale = 6  # 96 pixels enlarged to at least 512
        assert [float(v) for v in sc.PixelSpacing] == pytest.approx([3.5 / scale] * 2)
        assert pixels.shape[1] == 96 * scale
    # Nodule 1 is red (its label colour) around its centre on the first SC.
    nodule = next(s for s in prediction.segments if s.tracking_id == "Nodule 1")
    k = int(nodule.key_slice)  # type: ignore[arg-type]
    assert scs[0].SourceImageSequence[0].ReferencedSOPInstanceUID == sources[k].SOPInstanceUID
    rows, cols = np.nonzero(nodule.mask[k])
    cy, cx = (rows.mean() + 0.5) * 6 + BANNER_HEIGHT, (cols.mean() + 0.5) * 6
    r = np.sqrt(nodule.mask[k].sum() / np.pi) * 6
    red = np.all(scs[0].pixel_array == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red[BANNER_HEIGHT:BANNER_HEIGHT + 96 * 6])
    dist = np.hypot(ys + BANNER_HEIGHT - cy, xs - cx)
    assert red.sum() > 100 and np.median(np.abs(dist - r)) < 4


def test_an_empty_prediction_still_gives_one_of_each_saying_no_finding(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """Nothing found: no SEG, but a GSPS text, a KOS and one SC say "no finding"."""
    sources, refs = single_frame_sources(phantom)
    prediction = Prediction("ct-lung-nodules", "1.0.0")
    results = encode_outputs(prediction, volume_of(phantom), sources, refs, ALL)
    assert results["seg"] == [] and len(results["sc"]) == 1 and len(results["gsps"]) == 1
    text = results["gsps"][0].GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    assert text == "ct-lung-nodules 1.0.0: no finding"
    for name in ("gsps", "kos", "sc"):
        dciodvfy_clean(save(results[name][0], tmp_path / f"{name}.dcm"))


def test_a_series_with_per_slice_rescale_gets_one_gsps_per_rescale(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """One Modality LUT per presentation state: images with different rescale slopes are split
    over several states of one series, together covering every image, each finding drawn once."""
    from tests.support.quirks import RESCALES, per_slice_rescale

    sources, refs = single_frame_sources(phantom)
    sources = per_slice_rescale(sources)
    results = encode_outputs(phantom_prediction(phantom), volume_of(phantom), sources, refs, ("gsps",))
    states = results["gsps"]
    assert len(states) == len(set(RESCALES)) > 1
    assert len({s.SeriesInstanceUID for s in states}) == 1
    assert len({s.SOPInstanceUID for s in states}) == len(states)
    covered = [r.ReferencedSOPInstanceUID for s in states
               for series in s.ReferencedSeriesSequence for r in series.ReferencedImageSequence]
    assert sorted(covered) == sorted(s.SOPInstanceUID for s in sources)
    texts = [t.UnformattedTextValue for s in states for a in s.get("GraphicAnnotationSequence", [])
             for t in a.get("TextObjectSequence", [])]
    assert sum(t.startswith("Nodule 1:") for t in texts) == 1
    for i, state in enumerate(states):
        assert {float(state.RescaleSlope)} <= {float(r[0]) for r in RESCALES}
        dciodvfy_clean(save(state, tmp_path / f"gsps{i}.dcm"))
