"""The "not applied" notice: a result saying a model did not run on a series, and why.

So that the absence of a finding is never mistaken for a negative result, a series the node
refused (wrong modality, geometry the model cannot use, a model error) can yield

* a small Enhanced SR: document title "Diagnostic imaging report" (LN 18748-4), the model as
  the observer device, its name and version (DCM 111001 / 111003), and the sentence
  "<model> was not applied: <reason>" as a Comment (DCM 121106);
* when the destination takes secondary captures, one RGB image with the AI banner and the
  same sentence.

UIDs derive from (source series, model, model version, ``notice-sr`` / ``notice-sc``): a
refusal repeated on a re-run replaces its notice at the archive.  The reason is the node's own
refusal text, which never quotes patient data.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept, ContainerContentItem, RelationshipTypeValues, TextContentItem
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.results.common import (
    ResultEncodingError,
    ResultOptions,
    ResultUIDs,
    copy_body_part,
    fill_type2,
    lo,
    with_type2,
)
from dicom_node.results.sc import (
    BANNER_COLOR,
    BANNER_HEIGHT,
    EN_DASH,
    LINE_HEIGHT,
    TEXT_COLOR,
    draw_text,
)
from dicom_node.uids import validate_uid

DIAGNOSTIC_IMAGING_REPORT = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
COMMENT = CodedConcept("121106", "DCM", "Comment")
ALGORITHM_NAME = CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = CodedConcept("111003", "DCM", "Algorithm Version")
#: Shown when the model's version is not known (it failed before it was loaded).
UNKNOWN_VERSION = "unknown"
#: Width of the notice image and characters per line of its text.
NOTICE_WIDTH = 640
_CHARS_PER_LINE = 70


@dataclass(frozen=True)
class Notice:
    """What the notice says."""

    model_name: str
    model_version: str
    reason: str

    @property
    def sentence(self) -> str:
        """``"<model> was not applied: <reason>"``."""
        return f"{self.model_name} was not applied: {self.reason}"

    @property
    def banner(self) -> str:
        return (
            f"AI result {EN_DASH} {self.model_name} {self.model_version} {EN_DASH} "
            "not for primary diagnosis"
        )


def _uids(notice: Notice, source: Dataset) -> ResultUIDs:
    series = validate_uid(source.SeriesInstanceUID, "source SeriesInstanceUID")
    return ResultUIDs(series, notice.model_name, notice.model_version or UNKNOWN_VERSION)


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def notice_sr(notice: Notice, sources: Sequence[Dataset], options: ResultOptions) -> Dataset:
    """The notice as an Enhanced SR in the study of ``sources`` (headers suffice)."""
    if not sources:
        raise ResultEncodingError("a notice needs at least one source image header")
    images = [with_type2(s) for s in sources]
    uids = _uids(notice, images[0])
    root = ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    device = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device, name=lo(notice.model_name),
            manufacturer_name=lo(options.manufacturer),
        ),
    )
    items: list[Any] = [*device]
    items += [
        _text(ALGORITHM_NAME, lo(notice.model_name)),
        _text(ALGORITHM_VERSION, lo(notice.model_version or UNKNOWN_VERSION)),
        _text(COMMENT, notice.sentence),
    ]
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.EnhancedSR(
        evidence=images,
        content=root,
        series_instance_uid=uids.series("notice-sr"),
        series_number=options.series_number("notice-sr"),
        sop_instance_uid=uids.instance("notice-sr"),
        instance_number=1,
        manufacturer=lo(options.manufacturer),
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=lo(f"AI NOT APPLIED {notice.model_name}"),
    )
    sr.DeviceUID = uids.device
    fill_type2(sr)
    return sr


def render_notice(notice: Notice) -> np.ndarray:
    """The RGB pixels of the notice image: the AI banner, then the sentence wrapped."""
    lines = textwrap.wrap(notice.sentence, _CHARS_PER_LINE) or [notice.sentence]
    height = BANNER_HEIGHT + 16 + LINE_HEIGHT * len(lines) + 16
    canvas = Image.new("RGB", (NOTICE_WIDTH, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (6, 5), notice.banner, BANNER_COLOR)
    y = BANNER_HEIGHT + 16
    for line in lines:
        draw_text(draw, (6, y), line, TEXT_COLOR)
        y += LINE_HEIGHT
    return np.asarray(canvas, dtype=np.uint8)


def notice_sc(notice: Notice, sources: Sequence[Dataset], options: ResultOptions) -> Dataset:
    """The notice as one RGB secondary capture in the study of ``sources``."""
    if not sources:
        raise ResultEncodingError("a notice needs at least one source image header")
    source = with_type2(sources[0])
    uids = _uids(notice, source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=render_notice(notice),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.series("notice-sc"),
        series_number=options.series_number("notice-sc"),
        sop_instance_uid=uids.instance("notice-sc"),
        instance_number=1,
        manufacturer=lo(options.manufacturer),
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=lo(f"AI NOT APPLIED {notice.model_name}"),
    )
    sc.copy_patient_and_study_information(source)
    # A text image has no orientation: Patient Orientation (Type 2) is present and empty.
    setattr(sc, "PatientOrientation", None)  # noqa: B010  (typed as list[str] by pydicom)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DeviceUID = uids.device
    sc.DerivationDescription = lo(notice.sentence)
    copy_body_part(sc, source)
    fill_type2(sc)
    return sc


def source_headers(paths: Sequence[str | Path], limit: int = 512) -> list[Dataset]:
    """Headers (no pixel data) of the readable files among ``paths`` that share the first one's
    SOP class: what a notice needs of a series the loader refused."""
    headers: list[Dataset] = []
    for path in list(paths)[:limit]:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, InvalidDicomError, ValueError, EOFError):
            continue
    if headers:
        sop_class = headers[0].get("SOPClassUID")
        headers = [h for h in headers if h.get("SOPClassUID") == sop_class and "SOPInstanceUID" in h]
    return headers


def encode_notice(
    notice: Notice, sources: Sequence[Dataset], options: ResultOptions | None = None,
    *, with_sc: bool = False,
) -> list[Dataset]:
    """The notice SR, plus its secondary capture when ``with_sc``."""
    options = options or ResultOptions()
    out = [notice_sr(notice, sources, options)]
    if with_sc:
        out.append(notice_sc(notice, sources, options))
    return out
