"""Clean headers: a source that breaks the standard in optional attributes still yields
results with no dciodvfy error, and the not-applied notice (SR and SC)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from dicom_node.demo import ChestSpec, Phantom, SeriesInfo, Sphere, make_chest_phantom
from dicom_node.results import ResultEncodingError, ResultOptions, encode_outputs
from dicom_node.results.headers import UNSTATED_METHOD, clean_source, problems
from dicom_node.results.notice import Notice, encode_notice, render_notice
from dicom_node.results.sc import BANNER_COLOR, BANNER_HEIGHT, draw_text
from tests.conftest import require_tool
from tests.support import procs
from tests.support.result_examples import phantom_prediction, single_frame_sources, volume_of

ALL = ("seg", "sr", "gsps", "kos", "sc")


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_chest_phantom(ChestSpec(slices=24, nodules=(Sphere((-60.0, 10.0, 5.0), 20.0),)))


def break_optional_attributes(ds: Dataset) -> Dataset:
    """What real archives send: a ReferencedStudySequence item without ReferencedSOPClassUID,
    identity removed with an empty DeidentificationMethod, a PatientAge that is no AS, a
    StudyDate that is no DA (Type 2)."""
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedStudySequence = [item]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we want
        ds.PatientAge = "45"
        ds.StudyDate = "2026-01-02"
    return ds


def broken_sources(phantom: Phantom, modality: str = "CT") -> tuple[list[Dataset], list[tuple[int, int]]]:
    sources, refs = single_frame_sources(phantom, SeriesInfo(seed=f"broken-{modality}", modality=modality))
    return [break_optional_attributes(s) for s in sources], refs


def save(ds: Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def test_the_broken_source_is_really_invalid(phantom: Phantom, tmp_path: Path) -> None:
    """Control: dciodvfy finds the errors in the broken source image itself."""
    require_tool("dciodvfy")
    sources, _ = broken_sources(phantom)
    errors, _, text = procs.dciodvfy(save(sources[0], tmp_path / "source.dcm"))
    assert any("ReferencedSOPClassUID" in e for e in errors), text
    assert any("DeidentificationMethod" in e or "De-identification" in e for e in errors), text


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_results_of_a_broken_source_have_no_dciodvfy_error(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]], modality: str
) -> None:
    """SEG, SR, GSPS, KOS, SC and the notice SR/SC of the broken source pass dciodvfy -new;
    the invalid attributes are left out or emptied, the valid ones kept."""
    sources, refs = broken_sources(phantom, modality)
    results = encode_outputs(phantom_prediction(phantom), volume_of(phantom, modality), sources, refs, ALL)
    notice = encode_notice(Notice("ct-tissue", "1.0.0", "test refusal"), sources, with_sc=True)
    datasets = [*(d for ds in results.values() for d in ds), *notice]
    assert len(datasets) == 7  # SEG, SR, GSPS, one SC (one nodule), KOS, notice SR and SC
    for i, ds in enumerate(datasets):
        dciodvfy_clean(save(ds, tmp_path / f"{i}.dcm"))
        assert "ReferencedStudySequence" not in ds and "PatientAge" not in ds
        assert ds.DeidentificationMethod == UNSTATED_METHOD and ds.PatientIdentityRemoved == "YES"
        assert ds["StudyDate"].is_empty and ds.PatientID == sources[0].PatientID
    # The caller's datasets are left as they were.
    assert sources[0].DeidentificationMethod == "" and "ReferencedStudySequence" in sources[0]


def test_clean_source_keeps_valid_items_and_touches_nothing_valid(phantom: Phantom) -> None:
    """A valid source is returned as is; of a sequence only the broken items go."""
    (good, *_), _ = single_frame_sources(phantom)
    assert problems(good) == {} and clean_source(good) is good
    valid = Dataset()
    valid.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    valid.ReferencedSOPInstanceUID = "1.2.3.5"
    broken = Dataset()
    broken.ReferencedSOPInstanceUID = "1.2.3.4"
    good.ReferencedStudySequence = [valid, broken]
    cleaned = clean_source(good)
    assert [i.ReferencedSOPInstanceUID for i in cleaned.ReferencedStudySequence] == ["1.2.3.5"]
    assert len(good.ReferencedStudySequence) == 2


def test_notice_says_the_model_was_not_applied_and_why(
    phantom: Phantom, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """The notice SR carries "<model> was not applied: <reason>" (dsrdump shows it) in the
    source's study with its own series; the SC shows the banner and the sentence."""
    require_tool("dsrdump")
    sources, _ = single_frame_sources(phantom)
    notice = Notice("ct-lung-nodules", "1.0.0", "the series is MR, the model accepts CT")
    options = ResultOptions(series_numbers={"notice-sr": 9556, "notice-sc": 9557})
    sr, sc = encode_notice(notice, sources, options, with_sc=True)
    path = save(sr, tmp_path / "notice.dcm")
    dciodvfy_clean(path)
    dump = procs.run_tool(["dsrdump", "+Pl", str(path)]).stdout
    assert "ct-lung-nodules was not applied: the series is MR, the model accepts CT" in dump
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and int(sr.SeriesNumber) == 9556
    again = encode_notice(notice, sources, options)
    assert again[0].SOPInstanceUID == sr.SOPInstanceUID  # a repeated refusal replaces it
    back = pydicom.dcmread(save(sc, tmp_path / "notice-sc.dcm"))
    dciodvfy_clean(tmp_path / "notice-sc.dcm")
    assert back.BurnedInAnnotation == "YES" and int(back.SeriesNumber) == 9557
    pixels = back.pixel_array
    assert np.array_equal(pixels, render_notice(notice))
    band = Image.new("RGB", (pixels.shape[1], BANNER_HEIGHT))
    draw_text(ImageDraw.Draw(band), (6, 5), notice.banner, BANNER_COLOR)
    assert np.array_equal(pixels[:BANNER_HEIGHT], np.asarray(band))
    assert np.all(pixels[BANNER_HEIGHT:] == BANNER_COLOR, axis=-1).sum() == 0
    assert (pixels[BANNER_HEIGHT:].max(axis=-1) > 200).sum() > 500  # the white sentence


def test_notice_without_source_header_is_refused() -> None:
    """A notice needs the study it belongs to."""
    with pytest.raises(ResultEncodingError, match="at least one source image header"):
        encode_notice(Notice("m", "1", "r"), [])
