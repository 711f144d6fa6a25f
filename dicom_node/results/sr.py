"""TID 1500 Measurement Report of a prediction, as a Comprehensive 3D SR (highdicom).

Per segment (same Tracking Identifier/UID as its SEG segment in every group):

* a volumetric group (TID 1411) referencing the SEG segment, with the segment's measurements
  and, for lesions, the model's confidence as "Certainty of Finding" in percent;
* for a lesion, a planar group (TID 1410) with its outline on the key slice: a SCOORD POLYLINE
  (closed) on that slice's source image, which viewers draw on the image;
* for a lesion, a planar group (TID 1410) with a SCOORD3D POINT at its centre, geometric purpose
  "Center".

A segment with an empty mask has no SEG segment: it gets a TID 1501 group with its finding type
and "Presence of property: Absent".  A prediction with no segment gets one TID 1501 group
"Presence of property: Absent" plus a note.
Free-text notes go to the report-level "Qualitative Evaluations" container (TID 1500 row 12).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import (
    ContainerContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DataElementSequence
from pydicom.sr.codedict import codes as dcm_codes

from dicom_node.results import codes
from dicom_node.results.common import (
    ResultEncodingError,
    ResultOptions,
    ResultUIDs,
    SourceFrames,
    contributing_equipment,
    fill_type2,
    lo,
    series_description,
    source_series_uid,
)
from inference.prediction import Prediction, Segment, SegmentKind
from inference.volume import Volume

Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def _algorithm_id(prediction: Prediction) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=lo(prediction.model_name),
        version=lo(prediction.model_version),
        family=codes.ALGORITHM_FAMILY,
    )


def _tracking(segment: Segment, uids: ResultUIDs) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=uids.tracking(segment.tracking_id), identifier=lo(segment.tracking_id)
    )


def _measurements(segment: Segment) -> list[hd.sr.Measurement]:
    out = [
        hd.sr.Measurement(
            name=codes.coded(m.name),
            value=float(m.value),
            unit=codes.coded(m.unit),
        )
        for m in segment.measurements
    ]
    if segment.confidence is not None:
        out.append(
            hd.sr.Measurement(
                name=codes.CERTAINTY_OF_FINDING,
                value=round(100.0 * float(segment.confidence), 6),
                unit=codes.PERCENT,
            )
        )
    return out


def _centre(segment: Segment, volume: Volume) -> np.ndarray:
    if segment.centre is not None:
        return np.asarray(segment.centre, dtype=np.float64)
    # No centre from the model: the mask's centroid is the natural one.
    return volume.index_to_patient(np.argwhere(segment.mask).mean(axis=0))


def _outline_region(
    segment: Segment, volume: Volume, frames: SourceFrames
) -> hd.sr.ImageRegion | None:
    if segment.outline is None or segment.key_slice is None:
        return None
    k = int(segment.key_slice)
    if not 0 <= k < volume.shape[0]:
        raise ResultEncodingError(
            f"key slice {k} of {segment.tracking_id!r} is outside the volume "
            f"(0..{volume.shape[0] - 1})"
        )
    points = np.asarray(segment.outline, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2:
        raise ResultEncodingError(
            f"outline of {segment.tracking_id!r} must be (n >= 2, 3) LPS mm, got {points.shape}"
        )
    index = volume.patient_to_index(points)
    off = float(np.abs(index[:, 0] - k).max())
    if off > 0.5:
        raise ResultEncodingError(
            f"outline of {segment.tracking_id!r} leaves key slice {k} by {off:.2f} slices"
        )
    # SCOORD (column, row) puts 0.0 at the top-left corner of the first pixel: centres are +0.5.
    xy = np.stack([index[:, 2] + 0.5, index[:, 1] + 0.5], axis=1)
    if not np.allclose(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    image, frame = frames.image_of_slice(k)
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
        referenced_frame_numbers=[frame] if frame is not None else None,
    )
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=xy.astype(np.float32).astype(np.float64),
        source_image=source,
        pixel_origin_interpretation=(
            hd.sr.PixelOriginInterpretationValues.FRAME if frame is not None else None
        ),
    )


def _segment_groups(
    segment: Segment,
    segment_number: int | None,
    seg: Dataset | None,
    prediction: Prediction,
    volume: Volume,
    frames: SourceFrames,
    uids: ResultUIDs,
) -> list[Group]:
    label = segment.label
    common = {
        "tracking_identifier": _tracking(segment, uids),
        "finding_type": codes.coded(label.type),
        "finding_category": codes.coded(label.category),
        "algorithm_id": _algorithm_id(prediction),
    }
    if segment_number is None or seg is None:
        return [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                **common,  # type: ignore[arg-type]
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, codes.ABSENT)],
            )
        ]
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        # The source series, not 500 image references per group: the SEG itself lists them.
        source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid(frames)),
    )
    groups: list[Group] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            **common,  # type: ignore[arg-type]
            referenced_segment=referenced,
            measurements=_measurements(segment) or None,
        )
    ]
    if label.kind != SegmentKind.LESION:
        return groups
    outline = _outline_region(segment, volume, frames)
    if outline is not None:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                **common,  # type: ignore[arg-type]
                referenced_region=outline,
            )
        )
    frame_of_reference = str(frames.images[0].FrameOfReferenceUID)
    centre = _centre(segment, volume).reshape(1, 3)
    groups.append(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            **common,  # type: ignore[arg-type]
            referenced_region=hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=centre,
                frame_of_reference_uid=frame_of_reference,
            ),
            geometric_purpose=codes.CENTER,
        )
    )
    return groups


def _no_finding_group(prediction: Prediction, uids: ResultUIDs) -> Group:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.no_finding_tracking, identifier="No finding"
        ),
        algorithm_id=_algorithm_id(prediction),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, codes.ABSENT)],
    )


# TID 1602 descriptors that differ from image to image (Image Position (Patient) X/Y/Z).
_PER_IMAGE_DESCRIPTORS = {"110901", "110902", "110903"}


def _element(keyword: str, vr: str, value: object) -> DataElement:
    # Values come from datasets that already hold them as valid UIDs/codes: skip re-validation
    # (it is most of the cost of 500 library entries).
    tag = tag_for_keyword(keyword)
    assert tag is not None  # fixed keywords of the standard dictionary
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _library_entries(images: Sequence[Dataset]) -> list[Dataset]:
    name = Dataset()
    name.CodeValue = "260753009"
    name.CodingSchemeDesignator = "SCT"
    name.CodeMeaning = "Source"
    entries = []
    for image in images:
        reference = Dataset()
        reference.add(_element("ReferencedSOPClassUID", "UI", image.SOPClassUID))
        reference.add(_element("ReferencedSOPInstanceUID", "UI", image.SOPInstanceUID))
        item = Dataset()
        item.add(_element("ReferencedSOPSequence", "SQ", [reference]))
        item.add(_element("RelationshipType", "CS", "CONTAINS"))
        item.add(_element("ValueType", "CS", "IMAGE"))
        # One concept-name item shared by every entry: it is only ever read and written.
        item.add(_element("ConceptNameCodeSequence", "SQ", [name]))
        entries.append(item)
    return entries


def _functional_group_item(image: Dataset, sequence: str) -> Dataset | None:
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = getattr(image, groups, [None])[0]
        if group is not None and sequence in group:
            return group[sequence].value[0]  # type: ignore[no-any-return]
    return None


def _descriptor_source(image: Dataset) -> Dataset:
    """A single-frame view of ``image`` for highdicom's descriptors (which read PixelSpacing
    and friends at the top level, where an enhanced multi-frame image does not have them)."""
    if int(getattr(image, "NumberOfFrames", 1) or 1) <= 1:
        return image
    view = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "FrameOfReferenceUID",
        "Rows",
        "Columns",
    ):
        if keyword in image:
            view[keyword] = image[keyword]
    measures = _functional_group_item(image, "PixelMeasuresSequence")
    orientation = _functional_group_item(image, "PlaneOrientationSequence")
    if measures is not None and orientation is not None:
        view.PixelSpacing = measures.PixelSpacing
        if "SliceThickness" in measures:
            view.SliceThickness = measures.SliceThickness
        view.ImageOrientationPatient = orientation.ImageOrientationPatient
        position = _functional_group_item(image, "PlanePositionSequence")
        view.ImagePositionPatient = (
            position.ImagePositionPatient if position is not None else [0.0, 0.0, 0.0]
        )
    return view


def image_library(images: Sequence[Dataset]) -> Dataset:
    """TID 1600 Image Library: one group whose shared descriptors come from the first image.

    highdicom's ``ImageLibrary`` writes 16 descriptors per image through its validating
    content-item classes (~70 ms per image, 35 s for a 500-slice series); every image of one
    series shares them but its position, so the group carries them once (TID 1600 row 3) and
    each entry (TID 1601) is a plain IMAGE reference.
    """
    template = hd.sr.ImageLibrary([_descriptor_source(images[0])])[0]
    # Plain datasets from here: highdicom's content items re-validate on every assignment.
    library, group = Dataset(template), Dataset(template.ContentSequence[0])
    first = group.ContentSequence[0]
    shared = [
        Dataset(d)
        for d in first.ContentSequence
        if d.ConceptNameCodeSequence[0].CodeValue not in _PER_IMAGE_DESCRIPTORS
    ]
    group.ContentSequence = DataElementSequence([*shared, *_library_entries(images)])
    library.ContentSequence = DataElementSequence([group])
    return library


def _notes_container(notes: Sequence[str]) -> ContainerContentItem:
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            TextContentItem(
                name=codes.COMMENT, value=note, relationship_type=RelationshipTypeValues.CONTAINS
            )
            for note in notes
        ]
    )
    return container


def measurement_report(
    prediction: Prediction,
    volume: Volume,
    frames: SourceFrames,
    seg: Dataset | None,
    segment_numbers: dict[str, int],
    uids: ResultUIDs,
    options: ResultOptions,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree (root 126000 "Imaging Measurement Report")."""
    groups: list[Group] = []
    for segment in prediction.segments:
        number = segment_numbers.get(segment.tracking_id)
        groups.extend(_segment_groups(segment, number, seg, prediction, volume, frames, uids))
    notes = list(prediction.notes)
    if not prediction.segments:
        groups.append(_no_finding_group(prediction, uids))
        notes.insert(
            0, f"No finding reported by {prediction.model_name} {prediction.model_version}."
        )
    device = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device,
            name=lo(prediction.model_name),
            manufacturer_name=lo(options.manufacturer),
            model_name=lo(f"{prediction.model_name} {prediction.model_version}"),
        ),
    )
    first = frames.images[0]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.procedure_reported(
            str(first.Modality), getattr(first, "BodyPartExamined", None)
        ),
        imaging_measurements=groups,
    )
    if notes:
        report[0].ContentSequence.append(_notes_container(notes))
    return report


def encode_sr(
    prediction: Prediction,
    volume: Volume,
    frames: SourceFrames,
    seg: Dataset | None,
    segment_numbers: dict[str, int],
    uids: ResultUIDs,
    options: ResultOptions,
) -> hd.sr.Comprehensive3DSR:
    """Encode the prediction's measurement report as one Comprehensive 3D SR instance."""
    report = measurement_report(prediction, volume, frames, seg, segment_numbers, uids, options)
    evidence: list[Dataset] = [*frames.images, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=options.sr_series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=lo(options.manufacturer),
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description("SR", prediction),
        manufacturer_model_name=lo(prediction.model_name),
        software_versions=lo(options.software_version),
        device_serial_number=uids.device,
        contributing_equipment=[contributing_equipment(prediction, options, uids.device)],
    )
    # The library goes in after highdicom has copied and searched the (then small) tree;
    # TID 1500 puts it right after Procedure Reported (row 8), before Imaging Measurements.
    position = next(
        i
        for i, item in enumerate(sr.ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    items = list(sr.ContentSequence)
    items.insert(position, image_library(frames.images))
    sr.ContentSequence = DataElementSequence(items)
    sr.DeviceUID = uids.device
    fill_type2(sr)
    return sr
