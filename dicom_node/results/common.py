"""What the SEG and SR encoders share: options, derived UIDs and the source-frame mapping."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from highdicom import ContributingEquipment
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import dicom_node
from dicom_node.errors import PermanentError
from dicom_node.results import codes
from dicom_node.results.headers import clean_source, shallow_copy
from dicom_node.uids import derived_uid, validate_uid
from inference.prediction import Prediction
from inference.volume import Volume

#: Longest value of a LO attribute (SeriesDescription, labels).
_LO_MAX = 64


class ResultEncodingError(PermanentError):
    """The prediction, the volume and the source images do not fit together."""


#: Series Number of each kind of result within a model's block of ten (see
#: :func:`model_series_numbers`); without a block, 9900 + offset (SEG 9901, SR 9902...).
SERIES_OFFSETS: dict[str, int] = {
    "seg": 1,
    "sr": 2,
    "gsps": 3,
    "kos": 4,
    "sc": 5,
    "notice-sr": 6,
    "notice-sc": 7,
    "seg-resampled": 8,
}
#: Model blocks 1..89: with the default base 9000, Series Numbers 9011..9897 (below 9901).
SERIES_SLOTS = 89


def series_slot(model_name: str) -> int:
    """The default block (1..89) of a model's Series Numbers: a hash of its name, so it never
    changes when other models are added (two models that collide get an explicit slot)."""
    digest = hashlib.sha256(model_name.encode("utf-8")).hexdigest()
    return 1 + int(digest, 16) % SERIES_SLOTS


def model_series_numbers(base: int, slot: int) -> dict[str, int]:
    """Series Number of each kind of result of the model in ``slot``: ``base + 10 * slot +
    offset`` (e.g. base 9000, slot 74: SEG 9741, SR 9742, GSPS 9743, KOS 9744, SC 9745)."""
    return {kind: base + 10 * slot + offset for kind, offset in SERIES_OFFSETS.items()}


@dataclass(frozen=True)
class ResultOptions:
    """How results are encoded (series numbers, equipment, SEG type and transfer syntax)."""

    seg_series_number: int = 9901
    sr_series_number: int = 9902
    #: Series Number per kind of result (``SERIES_OFFSETS`` keys); overrides the two above.
    series_numbers: Mapping[str, int] = field(default_factory=dict)
    manufacturer: str = "dicom-node"
    #: ``"BINARY"`` (default), ``"FRACTIONAL"`` or ``"LABELMAP"`` (non-overlapping segments only).
    segmentation_type: str = "BINARY"
    #: Explicit VR Little Endian by default; JPEG 2000 Lossless / JPEG-LS Lossless as options.
    seg_transfer_syntax: str = ExplicitVRLittleEndian
    software_version: str = dicom_node.__version__

    def resolved(self) -> ResultOptions:
        """These options with ``seg_series_number`` / ``sr_series_number`` taken from
        ``series_numbers`` (the SEG and SR encoders read those two fields)."""
        return dataclasses.replace(
            self,
            seg_series_number=self.series_number("seg"),
            sr_series_number=self.series_number("sr"),
        )

    def series_number(self, kind: str) -> int:
        """Series Number of the results of ``kind`` (``"seg"``, ``"gsps"``, ``"notice-sr"``...)."""
        if kind in self.series_numbers:
            return int(self.series_numbers[kind])
        if kind == "seg":
            return self.seg_series_number
        if kind == "sr":
            return self.sr_series_number
        return 9900 + SERIES_OFFSETS[kind]


def device_uid(model_name: str, model_version: str, model_digest: str = "") -> str:
    """Device UID of a model: the same for every series, a new one for every version or weights digest."""
    return derived_uid("device", model_name, model_version, *([model_digest] if model_digest else []))


@dataclass(frozen=True)
class ResultUIDs:
    """Every UID of one result, derived from (source series, model name, model version)."""

    source_series: str
    model_name: str
    model_version: str
    model_digest: str = ""

    def _derive(self, *parts: str) -> str:
        return derived_uid(self.source_series, self.model_name, self.model_version, *parts)

    @cached_property
    def seg_series(self) -> str:
        return self._derive("seg", "series")

    @cached_property
    def seg_instance(self) -> str:
        return self._derive("seg", "instance")

    @cached_property
    def sr_series(self) -> str:
        return self._derive("sr", "series")

    @cached_property
    def sr_instance(self) -> str:
        return self._derive("sr", "instance")

    def series(self, kind: str) -> str:
        """SeriesInstanceUID of the results of ``kind`` (``"gsps"``, ``"kos"``, ``"sc"``...)."""
        return self._derive(kind, "series")

    def instance(self, kind: str, *parts: str) -> str:
        """SOPInstanceUID of a result of ``kind`` (``parts`` tell several instances apart)."""
        return self._derive(kind, "instance", *parts)

    @cached_property
    def device(self) -> str:
        """The algorithm as a device (see :func:`device_uid`)."""
        return device_uid(self.model_name, self.model_version, self.model_digest)

    @cached_property
    def no_finding_tracking(self) -> str:
        """TrackingUID of the "no finding" group of an empty prediction."""
        return self._derive("sr", "tracking", "no-finding")

    def tracking(self, tracking_id: str) -> str:
        """TrackingUID of a finding, shared by its SEG segment and its SR measurement groups."""
        cache: dict[str, str] = self.__dict__.setdefault("_tracking", {})
        if tracking_id not in cache:
            cache[tracking_id] = self._derive("seg", "tracking", tracking_id)
        return cache[tracking_id]


@dataclass(frozen=True)
class SourceFrames:
    """The source images in the order the SEG wants them, and where each volume slice lies.

    For single-frame sources ``images[k]`` is the image of slice ``k`` and ``frame_of_slice[k]
    == k``; for one enhanced multi-frame source ``images`` holds that dataset and
    ``frame_of_slice[k]`` is the 0-based frame of slice ``k`` (the SEG pixel array has one
    plane per source frame, frames no slice uses stay empty).
    """

    images: list[Dataset]
    multiframe: bool
    frame_of_slice: np.ndarray
    n_frames: int

    def image_of_slice(self, k: int) -> tuple[Dataset, int | None]:
        """The source dataset of slice ``k`` and its 1-based frame number (None if single-frame)."""
        if self.multiframe:
            return self.images[0], int(self.frame_of_slice[k]) + 1
        return self.images[k], None


def source_frames(
    sources: Sequence[Dataset], frame_refs: Sequence[tuple[int, int]]
) -> SourceFrames:
    """Check ``frame_refs`` against ``sources`` and arrange the sources for highdicom."""
    if not frame_refs:
        raise ResultEncodingError("frame_refs is empty: a volume needs at least one source frame")
    indices = sorted({i for i, _ in frame_refs})
    for i in indices:
        if not 0 <= i < len(sources):
            raise ResultEncodingError(
                f"frame_refs points at source {i}, but there are {len(sources)}"
            )
    multiframe = [i for i in indices if int(getattr(sources[i], "NumberOfFrames", 1) or 1) > 1]
    if multiframe:
        if len(indices) != 1:
            raise ResultEncodingError(
                f"a volume from several multi-frame sources is not supported (sources {indices})"
            )
        image = with_type2(sources[indices[0]])
        n_frames = int(image.NumberOfFrames)
        frames = np.array([f for _, f in frame_refs], dtype=np.int64) - 1
        if frames.min() < 0 or frames.max() >= n_frames:
            raise ResultEncodingError(
                f"frame_refs has frame numbers outside 1..{n_frames}: "
                f"{sorted(set((frames + 1).tolist()))[:5]}"
            )
        if len(set(frames.tolist())) != len(frames):
            raise ResultEncodingError("frame_refs names the same source frame for two slices")
        return SourceFrames([image], True, frames, n_frames)
    if len(indices) != len(frame_refs):
        raise ResultEncodingError("frame_refs names the same source image for two slices")
    images = [with_type2(sources[i]) for i, _ in frame_refs]
    return SourceFrames(images, False, np.arange(len(images)), len(images))


def _frame_position(frames: SourceFrames, k: int) -> np.ndarray:
    image, frame = frames.image_of_slice(k)
    if frame is None:
        return np.asarray(image.ImagePositionPatient, dtype=np.float64)
    item = image.PerFrameFunctionalGroupsSequence[frame - 1]
    return np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)


def check_geometry(frames: SourceFrames, volume: Volume) -> None:
    """Raise unless the volume's slices lie on the source frames they are said to come from.

    Slices are placed by ``volume.index_to_patient``, so a volume of several stacks
    (``inference.stacks.StackedVolume``) is checked where each of its stacks puts them.
    """
    shape, affine = volume.shape, volume.affine
    first = frames.images[0]
    rows, cols = int(first.Rows), int(first.Columns)
    if len(frames.frame_of_slice) != shape[0] or (rows, cols) != shape[1:]:
        raise ResultEncodingError(
            f"volume shape {shape} does not match {len(frames.frame_of_slice)} source frames "
            f"of {rows}x{cols}"
        )
    spacing = float(np.linalg.norm(affine[:3, 1:3], axis=0).min())
    # DS values carry ~6 significant digits; a real mismatch is at least a sizeable voxel fraction.
    tolerance = max(0.01, 0.05 * spacing)
    for k in (0, shape[0] // 2, shape[0] - 1):
        expected = volume.index_to_patient(np.array([k, 0.0, 0.0]))
        seen = _frame_position(frames, k)
        if float(np.abs(seen - expected).max()) > tolerance:
            raise ResultEncodingError(
                f"slice {k} of the volume is at {np.round(expected, 3).tolist()} mm but its "
                f"source frame is at {np.round(seen, 3).tolist()} mm"
            )


def check_prediction(prediction: Prediction, shape: tuple[int, int, int]) -> None:
    """Raise unless every mask has the volume's shape and tracking ids are unique."""
    seen: set[str] = set()
    for seg in prediction.segments:
        if seg.mask.shape != shape:
            raise ResultEncodingError(
                f"mask of segment {seg.label.name!r} has shape {seg.mask.shape}, volume has {shape}"
            )
        if seg.tracking_id in seen:
            raise ResultEncodingError(f"tracking id {seg.tracking_id!r} is used by two segments")
        seen.add(seg.tracking_id)
    if not prediction.model_name or not prediction.model_version:
        raise ResultEncodingError("the prediction names no model name or version")


def series_description(kind: str, prediction: Prediction) -> str:
    """E.g. ``"AI SEG ct-tissue 1.0.0"`` (cut to the 64 characters of a LO)."""
    return f"AI {kind} {prediction.model_name} {prediction.model_version}"[:_LO_MAX]


def lo(value: str) -> str:
    """Cut a value to the 64 characters of a LO element."""
    return value[:_LO_MAX]


def contributing_equipment(
    prediction: Prediction, options: ResultOptions, device: str
) -> ContributingEquipment:
    """The model as Contributing Equipment (processing equipment; serial number = Device UID)."""
    # dciodvfy (and PS3.3 as it knows it) has no Device UID in a Contributing Equipment item:
    # the UID goes in the serial number here and in the General Equipment module's DeviceUID.
    return ContributingEquipment(
        manufacturer=lo(options.manufacturer),
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=lo(prediction.model_name),
        software_versions=lo(prediction.model_version),
        device_serial_number=device,
        contribution_description=lo(f"AI model {prediction.model_name} {prediction.model_version}"),
    )


def source_series_uid(frames: SourceFrames) -> str:
    """SeriesInstanceUID of the source images (validated: it seeds every result UID)."""
    return validate_uid(frames.images[0].SeriesInstanceUID, "source SeriesInstanceUID")


# Type 2 attributes of the Patient and General Study modules: present, maybe empty.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def fill_type2(ds: Dataset) -> None:
    """Add the Patient/Study Type 2 attributes the source lacked, empty (highdicom skips them)."""
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, None)


def with_type2(source: Dataset) -> Dataset:
    """``source``, or a shallow copy with clean patient/study attributes and the missing Type 2
    ones empty.

    highdicom reads e.g. ``src.PatientBirthDate`` unconditionally and copies the patient and
    study modules as they are (see :mod:`dicom_node.results.headers`); the caller's dataset is
    left alone and no element (pixel data included) is copied.
    """
    cleaned = clean_source(source)
    if all(keyword in cleaned for keyword in _TYPE2_PATIENT_STUDY):
        return cleaned
    copy = shallow_copy(source) if cleaned is source else cleaned
    fill_type2(copy)
    return copy


def copy_body_part(result: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality of a new General Series from the source's.

    dciodvfy requires Laterality (Type 2C) unless it can tell from Body Part Examined that the
    part is unpaired: copy both when the source has them, else leave Laterality empty (unknown).
    """
    body_part = str(source.get("BodyPartExamined", "") or "")
    if body_part:
        result.BodyPartExamined = body_part
    laterality = str(source.get("Laterality", "") or "")
    if laterality:
        result.Laterality = laterality
    elif not body_part:
        result.Laterality = None
