"""TID 1500 Measurement Report of a prediction, as a Comprehensive 3D SR (highdicom).

Per segment with voxels (same Tracking Identifier/UID as its SEG segment in every group):

* a volumetric group (TID 1411) referencing the SEG segment, with the segment's volume counted
  from the SEG mask, its other measurements and, for lesions, the model's confidence as
  "Certainty of Finding" in percent;
* a planar group (TID 1410) with its outline on its key slice: a closed SCOORD POLYLINE on that
  slice's source image, which viewers draw on the image.  A lesion's outline comes from the
  model (its diameter, the outline's longest chord, goes in this group); a region's outline is
  the boundary of its largest part on the slice where it is largest;
* for a lesion, a planar group (TID 1410) with a SCOORD3D POINT at its centre, geometric purpose
  "Center".

Every group of the report thus has an image region: OHIF (v3) merges the groups of one
tracking UID and needs image coordinates in each merged finding (it throws on one without).
A finding type the model looked for and did not find (a segment with an empty mask) is not a
measurement group: it goes, with the free-text notes, to the report-level "Qualitative
Evaluations" container (TID 1500 row 12) as "<finding type> = Absent".  A prediction with no
segment gets one planar group "No finding" (Presence of property = Absent) framing the middle
source image, "Presence of property = Absent" in the evaluations, and a note.  A lung nodule
found in a CT carries its Finding Site: Lung, with the side (see :func:`lung_side`).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import (
    CodeContentItem,
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
from skimage import measure

from dicom_node.results import codes
from dicom_node.results.codes import MASS, NODULE
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
from inference.prediction import DIAMETER, ML, MM, VOLUME, Code, Prediction, Segment, SegmentKind
from inference.stacks import StackedVolume
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
    return hd.sr.TrackingIdentifier(uid=uids.tracking(segment.tracking_id), identifier=lo(segment.tracking_id))


def _is(code: Code | hd.sr.CodedConcept, other: Code | hd.sr.CodedConcept) -> bool:
    return (code.value, code.scheme_designator) == (other.value, other.scheme_designator)


def _has_own_outline(segment: Segment) -> bool:
    """The model outlined the segment on a key slice (else the encoder outlines its mask)."""
    return segment.outline is not None and segment.key_slice is not None


def mask_volume_ml(segment: Segment, volume: Volume) -> float:
    """The segment's volume as the SEG holds it: voxel count times the voxel volume (ml), summed
    over the stacks of a volume of several regular stacks."""
    if isinstance(volume, StackedVolume):
        total = sum(
            float(np.count_nonzero(segment.mask[start:stop])) * part.voxel_volume_ml
            for (start, stop), part in zip(volume.stacks, volume.stack_volumes(), strict=True)
        )
    else:
        total = float(np.count_nonzero(segment.mask)) * volume.voxel_volume_ml
    return round(total, 4)


def outline_diameter_mm(outline: np.ndarray) -> float:
    """Longest chord of a polygon in LPS mm (its maximum Feret diameter on the key slice)."""
    points = np.asarray(outline, dtype=np.float64)
    gaps = points[:, None, :] - points[None, :, :]
    return round(float(np.sqrt((gaps**2).sum(axis=-1)).max()), 2)


def _volumetric_measurements(segment: Segment, volume: Volume) -> list[hd.sr.Measurement]:
    """Whole-segment measurements; Volume (when reported) counted from the SEG mask."""
    out = []
    for m in segment.measurements:
        if _is(m.name, DIAMETER) and _has_own_outline(segment):
            continue  # a planar measurement: it goes with the outline it was measured on
        if _is(m.name, VOLUME):
            out.append(
                hd.sr.Measurement(
                    name=codes.coded(VOLUME), value=mask_volume_ml(segment, volume), unit=codes.coded(ML)
                )
            )
            continue
        out.append(hd.sr.Measurement(name=codes.coded(m.name), value=float(m.value), unit=codes.coded(m.unit)))
    if segment.label.kind == SegmentKind.LESION and not any(_is(m.name, VOLUME) for m in segment.measurements):
        out.insert(
            0,
            hd.sr.Measurement(name=codes.coded(VOLUME), value=mask_volume_ml(segment, volume), unit=codes.coded(ML)),
        )
    if segment.confidence is not None:
        out.append(
            hd.sr.Measurement(
                name=codes.CERTAINTY_OF_FINDING,
                value=round(100.0 * float(segment.confidence), 6),
                unit=codes.PERCENT,
            )
        )
    return out


def _planar_measurements(segment: Segment) -> list[hd.sr.Measurement]:
    """The diameter of a lesion with an outline: the outline's longest chord, in mm."""
    if not _has_own_outline(segment) or not any(_is(m.name, DIAMETER) for m in segment.measurements):
        return []
    assert segment.outline is not None
    return [
        hd.sr.Measurement(
            name=codes.coded(DIAMETER),
            value=outline_diameter_mm(segment.outline),
            unit=codes.coded(MM),
        )
    ]


def _centre(segment: Segment, volume: Volume) -> np.ndarray:
    if segment.centre is not None:
        return np.asarray(segment.centre, dtype=np.float64)
    # No centre from the model: the mask's centroid is the natural one.
    return volume.index_to_patient(np.argwhere(segment.mask).mean(axis=0))


def region_outline(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Key slice and closed outline ``(n, 2)`` (row, column) of a mask's largest part there.

    The key slice is the one where the mask has the most voxels (the first of equals); the
    outline is the iso-line at 0.5 between inside and outside pixel centres (scikit-image's
    marching squares) around the largest of its parts, thinned to within 0.5 pixel.
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    k = int(np.argmax(areas))
    plane = np.pad(mask[k], 1).astype(np.float32)
    contours = [c - 1.0 for c in measure.find_contours(plane, 0.5)]  # type: ignore[no-untyped-call]
    closed = [c for c in contours if len(c) >= 4 and np.allclose(c[0], c[-1])]

    def area(c: np.ndarray) -> float:
        y, x = c[:, 0], c[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))

    best = max(closed or contours, key=area)
    thin = measure.approximate_polygon(best, tolerance=0.5)  # type: ignore[no-untyped-call]
    if len(thin) < 4:
        thin = best
    if not np.allclose(thin[0], thin[-1]):
        thin = np.vstack([thin, thin[:1]])
    return k, thin


def _image_region(k: int, rows_cols: np.ndarray, frames: SourceFrames) -> hd.sr.ImageRegion:
    """A closed SCOORD POLYLINE on slice ``k``'s source image from (row, column) indices."""
    # SCOORD (column, row) puts 0.0 at the top-left corner of the first pixel: centres are +0.5.
    xy = np.stack([rows_cols[:, 1] + 0.5, rows_cols[:, 0] + 0.5], axis=1)
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
        pixel_origin_interpretation=(hd.sr.PixelOriginInterpretationValues.FRAME if frame is not None else None),
    )


def _outline_region(segment: Segment, volume: Volume, frames: SourceFrames) -> hd.sr.ImageRegion:
    """The lesion's own outline on its key slice, else the mask's outline (:func:`region_outline`)."""
    if not _has_own_outline(segment):
        k, rows_cols = region_outline(segment.mask)
        return _image_region(k, rows_cols, frames)
    assert segment.key_slice is not None
    k = int(segment.key_slice)
    if not 0 <= k < volume.shape[0]:
        raise ResultEncodingError(
            f"key slice {k} of {segment.tracking_id!r} is outside the volume (0..{volume.shape[0] - 1})"
        )
    points = np.asarray(segment.outline, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2:
        raise ResultEncodingError(f"outline of {segment.tracking_id!r} must be (n >= 2, 3) LPS mm, got {points.shape}")
    index = volume.patient_to_index(points)
    off = float(np.abs(index[:, 0] - k).max())
    if off > 0.5:
        raise ResultEncodingError(f"outline of {segment.tracking_id!r} leaves key slice {k} by {off:.2f} slices")
    return _image_region(k, index[:, 1:], frames)


#: Soft tissue and denser (HU): the patient's body on a CT slice, for the midline.
_BODY_HU = -500.0


def lung_side(segment: Segment, volume: Volume) -> hd.sr.CodedConcept | None:
    """Left or Right for a nodule or mass in a CT: which side of the body's midline its centre lies.

    The midline is the middle, along the patient's x axis (LPS: +x is the patient's left), of
    the voxels of at least -500 HU on the slice through the centre; the side is where the
    centre's x falls.  Neither lobe nor a nodule exactly on the midline can be told this way
    (within 1 mm of it: no side).  None for other findings or modalities.
    """
    if not (_is(segment.label.type, NODULE) or _is(segment.label.type, MASS)):
        return None
    if volume.modality.upper() != "CT":
        return None
    centre = _centre(segment, volume)
    k = int(np.clip(np.rint(volume.patient_to_index(centre.reshape(1, 3))[0, 0]), 0, volume.shape[0] - 1))
    body = np.argwhere(np.asarray(volume.array[k]) >= _BODY_HU)
    if body.size == 0:
        return None
    index = np.column_stack([np.full(len(body), k), body]).astype(np.float64)
    x = volume.index_to_patient(index)[:, 0]
    midline = 0.5 * (float(x.min()) + float(x.max()))
    if abs(float(centre[0]) - midline) < 1.0:
        return None
    return codes.LEFT if centre[0] > midline else codes.RIGHT


def _finding_sites(segment: Segment, volume: Volume) -> list[hd.sr.FindingSite] | None:
    side = lung_side(segment, volume)
    if side is None:
        return None
    return [hd.sr.FindingSite(anatomic_location=codes.FINDING_SITE_LUNG, laterality=side)]


def _segment_groups(
    segment: Segment,
    segment_number: int,
    seg: Dataset,
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
        "finding_sites": _finding_sites(segment, volume),
    }
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
            measurements=_volumetric_measurements(segment, volume) or None,
        ),
        # Every finding gets an outline on an image: OHIF draws it, and throws on a finding
        # without image coordinates.
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            **common,  # type: ignore[arg-type]
            referenced_region=_outline_region(segment, volume, frames),
            measurements=_planar_measurements(segment) or None,
        ),
    ]
    if label.kind != SegmentKind.LESION:
        return groups
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


def _no_finding_group(
    prediction: Prediction, volume: Volume, frames: SourceFrames, uids: ResultUIDs
) -> Group:
    """Nothing found: a planar group "No finding", Presence of property = Absent, whose image
    region frames the whole middle slice (the series was examined; OHIF needs image coordinates
    in every finding and one finding at least to open a report)."""
    k = volume.shape[0] // 2
    last_row, last_col = volume.shape[1] - 1, volume.shape[2] - 1
    mid_row, mid_col = last_row / 2.0, last_col / 2.0
    # Through the centres of the edge pixels (visible inside the image), with the edges' middle
    # points: 8 vertices, so OHIF does not take it for one of its 4-corner rectangle tools.
    frame = np.array(
        [
            [0.0, 0.0],
            [0.0, mid_col],
            [0.0, last_col],
            [mid_row, last_col],
            [last_row, last_col],
            [last_row, mid_col],
            [last_row, 0.0],
            [mid_row, 0.0],
            [0.0, 0.0],
        ]
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.no_finding_tracking, identifier="No finding"
        ),
        referenced_region=_image_region(k, frame, frames),
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
        view.ImagePositionPatient = position.ImagePositionPatient if position is not None else [0.0, 0.0, 0.0]
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


def _evaluations_container(absent: Sequence[Segment], nothing_found: bool, notes: Sequence[str]) -> Dataset:
    """TID 1500 row 12: "<finding type> = Absent" per finding not found, then the notes."""
    items: list[CodeContentItem | TextContentItem] = []
    if nothing_found:
        items.append(
            CodeContentItem(name=codes.PRESENCE, value=codes.ABSENT, relationship_type=RelationshipTypeValues.CONTAINS)
        )
    seen: set[tuple[str, str]] = set()
    for segment in absent:
        key = (segment.label.type.value, segment.label.type.scheme_designator)
        if key in seen:
            continue
        seen.add(key)
        items.append(
            CodeContentItem(
                name=codes.coded(segment.label.type),
                value=codes.ABSENT,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    items.extend(
        TextContentItem(name=codes.COMMENT, value=note, relationship_type=RelationshipTypeValues.CONTAINS)
        for note in notes
    )
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
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
    absent: list[Segment] = []
    for segment in prediction.segments:
        number = segment_numbers.get(segment.tracking_id)
        if number is None or seg is None:
            absent.append(segment)
            continue
        groups.extend(_segment_groups(segment, number, seg, prediction, volume, frames, uids))
    notes = list(prediction.notes)
    if not prediction.segments:
        notes.insert(0, f"No finding reported by {prediction.model_name} {prediction.model_version}.")
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
        procedure_reported=codes.procedure_reported(str(first.Modality), getattr(first, "BodyPartExamined", None)),
        imaging_measurements=groups or [_no_finding_group(prediction, volume, frames, uids)],
    )
    content = report[0].ContentSequence
    if absent or notes or not prediction.segments:
        content.append(_evaluations_container(absent, not prediction.segments, notes))
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
        (
            i
            for i, item in enumerate(sr.ContentSequence)
            if item.ConceptNameCodeSequence[0].CodeValue in ("126010", "C0034375")
        ),
        len(sr.ContentSequence),
    )
    items = list(sr.ContentSequence)
    items.insert(position, image_library(frames.images))
    sr.ContentSequence = DataElementSequence(items)
    sr.DeviceUID = uids.device
    fill_type2(sr)
    return sr
