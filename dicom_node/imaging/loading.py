"""Series -> :class:`inference.Volume` loading that survives what real scanners send.

A spooled series is a bag of files: single-frame slices in any order, or enhanced multi-frame
instances, possibly with localizers, a second echo, a duplicated slice or a gap.  This module
turns it into one regular stack with an exact voxel -> LPS affine, or refuses with a
:class:`SeriesError` whose message says what is wrong, so a job can be ``failed`` with it.

Rules, in the order they are applied:

1. every file must read and belong to one SeriesInstanceUID and one FrameOfReferenceUID;
2. instances without pixel data (SR, PR, KO...) and localizers are excluded with a reason;
3. images are grouped by ImageOrientationPatient; the largest group is the volume, the others
   are excluded (a tie is refused: there is no defensible choice);
4. Rows, Columns and PixelSpacing must agree within the volume;
5. images are sorted along the slice normal; images at the same position are split by
   EchoNumbers, AcquisitionNumber, TemporalPositionIdentifier (or their enhanced multi-frame
   equivalents) keeping the fullest stack, and refused when nothing tells them apart;
6. consecutive positions must lie on a regular grid (gantry tilt is a sheared but regular grid,
   kept exactly in the affine), or on consecutive regular grids of different spacing (a head
   CT's 4 mm then 7 mm stacks), each of at least 3 slices (:mod:`dicom_node.imaging.stacking`):
   the volume is then an :class:`inference.stacks.StackedVolume`, each stack with its exact
   affine.  Anything else is refused naming the cause (slices missing between two positions, a
   gap between stacks, steps that form no regular stack), never averaged or resampled away;
7. pixel data are decoded straight into the volume in a thread pool (compressed lossless frames
   by imagecodecs, which releases the GIL), the bits above BitsStored are ignored, MONOCHROME1
   is inverted within the stored bit range, and the per-image rescale slope/intercept is applied.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.imaging.errors import SeriesError as SeriesError  # re-exported: the loader's error
from dicom_node.imaging.stacking import (
    POSITION_TOLERANCE_MM,
    RELATIVE_SPACING_TOLERANCE,
    regular_stacks,
)
from dicom_node.logs import scrub_text
from inference.stacks import StackedVolume, describe_stacks
from inference.volume import Volume

#: Two ImageOrientationPatient values are "the same orientation" if no cosine differs more.
ORIENTATION_TOLERANCE = 1e-4
#: A slice step further than this from the normal is reported as gantry tilt (degrees).
TILT_REPORT_THRESHOLD_DEG = 0.01
#: What tells apart images at the same position, tried in this order: (what, single-frame
#: attribute, enhanced multi-frame attribute of the per-frame functional groups).
SPLIT_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("echo", "EchoNumbers", "EffectiveEchoTime"),
    ("acquisition", "AcquisitionNumber", "FrameAcquisitionNumber"),
    ("time point", "TemporalPositionIdentifier", "TemporalPositionIndex"),
)

# Exceptions pydicom and its decoder plugins raise on a corrupt or truncated file; a file is
# untrusted input, so each is turned into a SeriesError naming the file.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, NotImplementedError, RuntimeError, OverflowError,
)
# Corrupt encapsulated pixel data also fails in pydicom's fragment parser or in a codec.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (*_READ_ERRORS, struct.error, BytesLengthException)
#: Non-identifying attributes copied into ``Volume.metadata`` (keyword, metadata key).
_HINT_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("BodyPartExamined", "body_part"),
    ("SeriesDescription", "series_description"),
    ("Manufacturer", "manufacturer"),
    ("PatientPosition", "patient_position"),
    ("ConvolutionKernel", "convolution_kernel"),
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LITTLE_ENDIAN_NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Threads filling the volume; the decoders used for the common syntaxes and NumPy release the
#: GIL, so frames decode and rescale in parallel.
DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class LoadedSeries:
    """A series loaded as one volume plus what the result encoders need to reference it."""

    #: float32 ``(slices, rows, columns)`` of rescaled values (HU for CT), exact LPS affine.
    volume: Volume
    #: Source datasets without pixel data, in order of first use by the volume.
    sources: list[Dataset]
    #: Per volume slice: (index into ``sources``, 1-based frame number; 1 for single-frame).
    frame_refs: list[tuple[int, int]]
    #: (SOPInstanceUID, reason) of every instance or frame left out of the volume.
    excluded: list[tuple[str, str]]


@dataclass(frozen=True)
class _Plane:
    """One 2D image (a single-frame instance or one frame of a multi-frame instance)."""

    source: int
    frame: int
    sop_instance_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    slice_thickness: float | None
    multiframe: bool
    #: (what, attribute keyword, value) for each entry of SPLIT_ATTRIBUTES present.
    split_keys: tuple[tuple[str, str, str], ...]

    @property
    def label(self) -> str:
        if self.multiframe:
            return f"{self.sop_instance_uid} frame {self.frame}"
        return self.sop_instance_uid

    def split_key(self, what: str) -> tuple[str, str] | None:
        """(attribute keyword, value) telling this image apart by ``what``, if present."""
        return next(((kw, v) for w, kw, v in self.split_keys if w == what), None)


def load_series(paths: Sequence[Path], *, modality_hint: str | None = None) -> LoadedSeries:
    """Load the files of one series as a single regular volume, or raise :class:`SeriesError`.

    Parameters
    ----------
    paths:
        The Part 10 files of the series, in any order.
    modality_hint:
        Modality to assume when the files carry none; when they do and it differs, the series
        is refused (it was routed as something it is not).

    Returns
    -------
    LoadedSeries
        The volume, its header-only source datasets, per-slice frame references and the
        instances left out with their reasons.
    """
    if not paths:
        raise SeriesError("the series has no files")
    try:
        return _load(paths, modality_hint)
    except SeriesError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, RuntimeError,
            OverflowError, struct.error, BytesLengthException) as exc:
        # pydicom converts values lazily: a malformed element surfaces only when it is read.
        # pydicom's message may quote a value: scrubbed, as it becomes the job's reason.
        raise SeriesError(f"the series holds malformed data: {type(exc).__name__}: "
                          f"{scrub_text(str(exc))[:200]}") from exc


def _load(paths: Sequence[Path], modality_hint: str | None) -> LoadedSeries:
    files = _read_all([Path(p) for p in paths])
    datasets = [f.dataset for f in files]
    _check_identity(datasets, [Path(p) for p in paths])
    modality = _modality(datasets, modality_hint)

    excluded: list[tuple[str, str]] = []
    planes: list[_Plane] = []
    for index, (file, path) in enumerate(zip(files, paths, strict=True)):
        planes.extend(_planes_of(index, file, Path(path), excluded))
    if not planes:
        reasons = "; ".join(sorted({r for _, r in excluded})) or "no images"
        raise SeriesError(f"no image of the series can form a volume ({reasons})")

    planes = _main_orientation(planes, excluded)
    _check_matrix(planes)
    planes = _sorted_unique_positions(planes, excluded)
    stacks = regular_stacks(np.asarray([p.position for p in planes], dtype=np.float64),
                            _normal(planes[0].orientation))
    geometries = [_geometry(planes[start:stop]) for start, stop in stacks]
    hints = _hints(datasets[planes[0].source])
    affine, metadata = geometries[0] if len(stacks) == 1 else (geometries[0][0], {})
    metadata.update(hints)

    used = list(dict.fromkeys(p.source for p in planes))
    slices_of: dict[int, list[tuple[int, _Plane]]] = {}
    for k, plane in enumerate(planes):
        slices_of.setdefault(plane.source, []).append((k, plane))
    array = np.empty((len(planes), planes[0].rows, planes[0].columns), dtype=np.float32)
    # Every job reads its pixel data from the file and writes its own slices straight into the
    # volume: peak memory stays near the output volume plus a frame or an instance per thread.
    _fill(array, [job for i in used for job in _jobs(array, files[i], Path(paths[i]), slices_of[i])])
    inverted = any(files[i].pixels.monochrome1 for i in used)
    if inverted:
        metadata["photometric"] = "MONOCHROME1 inverted"

    source_index = {src: i for i, src in enumerate(used)}
    sources = [datasets[i] for i in used]
    for ds in sources:
        for keyword in _PIXEL_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
    frame_refs = [(source_index[p.source], p.frame) for p in planes]
    volume: Volume
    if len(stacks) == 1:
        volume = Volume(array=array, affine=affine, modality=modality, metadata=metadata)
    else:
        volume = StackedVolume(array=array, affine=affine, modality=modality, metadata=metadata,
                               stacks=tuple(stacks), stack_affines=tuple(a for a, _ in geometries),
                               stack_metadata=tuple(m for _, m in geometries))
        volume.metadata["stacks"] = describe_stacks(volume).removeprefix("processed as ")
    return LoadedSeries(volume=volume, sources=sources, frame_refs=frame_refs, excluded=excluded)


# --- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    """One file of the series as read: its header and where its pixel data are."""

    dataset: Dataset
    pixels: _Pixels
    #: (offset, length) of the Pixel Data value in the file, read later by a decoding thread;
    #: length None is undefined (encapsulated).  None when ``dataset`` holds the pixel data
    #: (read with the header for pydicom to decode) or the file has none.
    location: tuple[int, int | None] | None

    @property
    def has_pixels(self) -> bool:
        return self.location is not None or any(k in self.dataset for k in _PIXEL_KEYWORDS)


def _read_one(path: Path) -> _File:
    try:
        with path.open("rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            start = fp.tell()
            head = fp.read(12)
        pixels = _pixels_of(ds, path)
        location = _pixel_data_location(pixels, start, head)
        if location is None and (head or pixels.syntax == DeflatedExplicitVRLittleEndian):
            # Pixel data only pydicom decodes (or finds, in a deflated file): read it all.
            ds = pydicom.dcmread(path)
    except _READ_ERRORS as exc:
        raise SeriesError(f"cannot read file {path.name} of the series: {scrub_text(str(exc))}") from exc
    return _File(dataset=ds, pixels=pixels, location=location)


def _pixel_data_location(pixels: _Pixels, start: int, head: bytes) -> tuple[int, int | None] | None:
    """(offset, length) of the Pixel Data value whose element starts at ``start`` with
    ``head``, when a decoding thread can read and decode it without pydicom."""
    native = pixels.syntax in _LITTLE_ENDIAN_NATIVE
    if (pixels.dtype is None or not (native or pixels.syntax in _GIL_FREE_DECODERS)
            or head[:4] != _PIXEL_DATA_TAG):
        return None
    if pixels.syntax == ImplicitVRLittleEndian:
        header, length = 8, int.from_bytes(head[4:8], "little")
    elif len(head) == 12 and head[4:6] in (b"OB", b"OW"):
        header, length = 12, int.from_bytes(head[8:12], "little")
    else:
        return None
    if native:
        return (start + header, length) if length != _UNDEFINED_LENGTH else None
    if length != _UNDEFINED_LENGTH or pixels.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    return (start + header, None)


def _read_all(paths: list[Path]) -> list[_File]:
    # Headers are parsed exactly once, here, in one thread: parsing holds the GIL, so threads
    # only fought over it (measured slower); the bulk of the I/O, the pixel data, is read
    # later by the decoding threads.
    return [_read_one(p) for p in paths]


def _check_identity(datasets: list[Dataset], paths: list[Path]) -> None:
    for ds, path in zip(datasets, paths, strict=True):
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            if keyword not in ds:
                raise SeriesError(f"file {path.name} has no {keyword}: it is truncated or not a "
                                  "DICOM instance")
    sops = Counter(str(ds.SOPInstanceUID) for ds in datasets)
    twice = [uid for uid, n in sops.items() if n > 1]
    if twice:
        raise SeriesError(f"SOP instance {twice[0]} appears in {sops[twice[0]]} files of the "
                          "series; refusing to guess which copy to use")
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = Counter(str(ds.get(keyword, "")) or "(none)" for ds in datasets)
        if len(values) > 1:
            listed = ", ".join(f"{v} ({n} files)" for v, n in values.most_common())
            raise SeriesError(f"the files mix {len(values)} {keyword} values: {listed}")


def _modality(datasets: list[Dataset], hint: str | None) -> str:
    values = Counter(str(ds.get("Modality", "")) for ds in datasets if ds.get("Modality"))
    if len(values) > 1:
        raise SeriesError(f"the series mixes modalities {sorted(values)}")
    if not values:
        if hint is None:
            raise SeriesError("the series has no Modality and no modality hint was given")
        return hint
    modality = next(iter(values))
    if hint is not None and hint != modality:
        raise SeriesError(f"the series has Modality {modality}, but {hint} was expected")
    return modality


# --- planes ------------------------------------------------------------------------------


def _floats(value: Any, count: int, what: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in (value if isinstance(value, Sequence) and
                                       not isinstance(value, str) else [value]))
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where} has an unreadable {what} {value!r}") from exc
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise SeriesError(f"{where} has {what} {list(out)}, expected {count} finite numbers")
    return out


def _is_localizer(image_type: Any) -> bool:
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).upper() == "LOCALIZER" for v in values)


def _first_item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None or keyword not in seq_owner:
        return None
    seq = seq_owner[keyword].value
    return seq[0] if seq else None


def _planes_of(
    index: int, file: _File, path: Path, excluded: list[tuple[str, str]]
) -> list[_Plane]:
    ds = file.dataset
    sop = str(ds.SOPInstanceUID)
    if not file.has_pixels:
        sop_class = UID(str(ds.SOPClassUID))
        if "Image Storage" in sop_class.name or "Rows" in ds:
            raise SeriesError(f"image {sop} (file {path.name}) has no pixel data: the file is "
                              "truncated or incomplete")
        excluded.append((sop, f"not an image ({sop_class.name or sop_class})"))
        return []
    if _is_localizer(ds.get("ImageType")):
        excluded.append((sop, "localizer (ImageType contains LOCALIZER)"))
        return []
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(f"image {sop} has SamplesPerPixel {ds.SamplesPerPixel}; only "
                          "greyscale images form a volume")
    if "ModalityLUTSequence" in ds:
        raise SeriesError(f"image {sop} uses a Modality LUT Sequence, which is not supported "
                          "(only RescaleSlope/RescaleIntercept)")
    for keyword in ("Rows", "Columns"):
        if keyword not in ds:
            raise SeriesError(f"image {sop} (file {path.name}) has no {keyword}")
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_planes(index, ds, excluded)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(f"image {sop} has {frames} frames but no per-frame functional groups "
                          "(PerFrameFunctionalGroupsSequence): the position of each frame is "
                          "unknown")
    return [_single_plane(index, ds, sop)]


def _single_plane(index: int, ds: Dataset, sop: str) -> _Plane:
    where = f"image {sop}"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(keyword) is None:
            raise SeriesError(f"{where} has no {keyword}: its place in the volume is unknown")
    keys = tuple((what, kw, str(ds.get(kw))) for what, kw, _ in SPLIT_ATTRIBUTES
                 if ds.get(kw) not in (None, ""))
    thickness = ds.get("SliceThickness")
    return _Plane(
        source=index,
        frame=1,
        sop_instance_uid=sop,
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        multiframe=False,
        split_keys=keys,
    )


def _enhanced_planes(index: int, ds: Dataset, excluded: list[tuple[str, str]]) -> list[_Plane]:
    sop = str(ds.SOPInstanceUID)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.PerFrameFunctionalGroupsSequence
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != frames:
        raise SeriesError(f"image {sop} has {frames} frames but {len(per_frame)} per-frame "
                          "functional group items")

    def group(item: Dataset, keyword: str) -> Dataset | None:
        # A functional group lives in the per-frame item or, when common, in the shared one.
        return _first_item(item, keyword) or _first_item(shared, keyword)

    out = []
    for n, item in enumerate(per_frame, start=1):
        where = f"frame {n} of image {sop}"
        frame_type = (group(item, "CTImageFrameTypeSequence")
                      or group(item, "MRImageFrameTypeSequence"))
        if _is_localizer(frame_type.get("FrameType") if frame_type is not None else None):
            excluded.append((sop, f"frame {n}: localizer (FrameType contains LOCALIZER)"))
            continue
        position = group(item, "PlanePositionSequence")
        orientation = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        if position is None or position.get("ImagePositionPatient") is None:
            raise SeriesError(f"{where} has no ImagePositionPatient: its place in the volume is "
                              "unknown")
        if orientation is None or orientation.get("ImageOrientationPatient") is None:
            raise SeriesError(f"{where} has no ImageOrientationPatient: its place in the volume "
                              "is unknown")
        if measures is None or measures.get("PixelSpacing") is None:
            raise SeriesError(f"{where} has no PixelSpacing")
        transform = group(item, "PixelValueTransformationSequence")
        content = group(item, "FrameContentSequence")
        echo = group(item, "MREchoSequence")
        keys: list[tuple[str, str, str]] = []
        for what, _, keyword in SPLIT_ATTRIBUTES:
            owner = echo if keyword == "EffectiveEchoTime" else content
            if owner is not None and owner.get(keyword) not in (None, ""):
                keys.append((what, keyword, str(owner.get(keyword))))
        thickness = measures.get("SliceThickness")
        out.append(_Plane(
            source=index,
            frame=n,
            sop_instance_uid=sop,
            position=_floats(position.ImagePositionPatient, 3, "ImagePositionPatient", where),  # type: ignore[arg-type]
            orientation=_floats(orientation.ImageOrientationPatient, 6,  # type: ignore[arg-type]
                                "ImageOrientationPatient", where),
            pixel_spacing=_floats(measures.PixelSpacing, 2, "PixelSpacing", where),  # type: ignore[arg-type]
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            slope=float(transform.get("RescaleSlope", 1.0) or 1.0) if transform else 1.0,
            intercept=float(transform.get("RescaleIntercept", 0.0) or 0.0) if transform else 0.0,
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            multiframe=True,
            split_keys=tuple(keys),
        ))
    return out


# --- stack selection ---------------------------------------------------------------------


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _main_orientation(planes: list[_Plane], excluded: list[tuple[str, str]]) -> list[_Plane]:
    groups: list[list[_Plane]] = []
    for plane in planes:
        for grp in groups:
            if max(abs(a - b) for a, b in zip(plane.orientation, grp[0].orientation,
                                               strict=True)) <= ORIENTATION_TOLERANCE:
                grp.append(plane)
                break
        else:
            groups.append([plane])
    groups.sort(key=len, reverse=True)
    if len(groups) > 1 and len(groups[0]) == len(groups[1]):
        listed = "; ".join(f"{len(g)} with {_fmt(g[0].orientation)}" for g in groups)
        raise SeriesError(f"mixed orientations ({listed}): no single stack forms the volume")
    main = groups[0]
    for grp in groups[1:]:
        for plane in grp:
            excluded.append((plane.sop_instance_uid, f"ImageOrientationPatient "
                             f"{_fmt(plane.orientation)} differs from the volume's "
                             f"{_fmt(main[0].orientation)}"))
    return main


def _check_matrix(planes: list[_Plane]) -> None:
    sizes = Counter((p.rows, p.columns) for p in planes)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} images)" for (r, c), n in sizes.most_common())
        raise SeriesError(f"images of the series differ in Rows x Columns: {listed}")
    ref = planes[0].pixel_spacing
    odd = [p for p in planes if max(abs(a - b) for a, b in zip(p.pixel_spacing, ref, strict=True))
           > 1e-4 * max(ref)]
    if odd:
        spacings = Counter(p.pixel_spacing for p in planes)
        listed = ", ".join(f"{_fmt(s)} mm ({n} images)" for s, n in spacings.most_common())
        raise SeriesError(f"images of the series differ in PixelSpacing: {listed}")


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    return np.asarray(np.cross(row, col), dtype=np.float64)


def _position_groups(planes: list[_Plane], normal: np.ndarray) -> list[list[_Plane]]:
    """Planes sorted along the normal, grouped when they share a position."""
    ordered = sorted(planes, key=lambda p: float(np.dot(p.position, normal)))
    groups: list[list[_Plane]] = []
    last = -math.inf
    for plane in ordered:
        d = float(np.dot(plane.position, normal))
        if groups and d - last <= POSITION_TOLERANCE_MM:
            groups[-1].append(plane)
        else:
            groups.append([plane])
        last = d
    return groups


def _split_value_order(value: str) -> tuple[float, str]:
    try:
        return (float(value), value)
    except ValueError:
        return (math.inf, value)


def _sorted_unique_positions(planes: list[_Plane], excluded: list[tuple[str, str]]) -> list[_Plane]:
    normal = _normal(planes[0].orientation)
    groups = _position_groups(planes, normal)
    for what, _, _ in SPLIT_ATTRIBUTES:
        if all(len(g) == 1 for g in groups):
            break
        keys = [p.split_key(what) for p in planes]
        if any(k is None for k in keys):
            continue
        # Only an attribute that differs within every shared position explains the duplicates;
        # e.g. AcquisitionNumber 1 and 2 on disjoint halves of a stack must not split it.
        if not all(len({p.split_key(what) for p in g}) == len(g) for g in groups):
            continue
        by_value: dict[str, list[_Plane]] = {}
        for plane, key in zip(planes, keys, strict=True):
            by_value.setdefault(key[1] if key else "", []).append(plane)
        # The fullest stack wins; among equals the first echo / acquisition / time point.
        keep = min(by_value, key=lambda v: (-len(by_value[v]), _split_value_order(v)))
        kept_key = by_value[keep][0].split_key(what)
        for value, members in sorted(by_value.items(), key=lambda kv: _split_value_order(kv[0])):
            if value == keep:
                continue
            for plane in members:
                key = plane.split_key(what)
                excluded.append((plane.sop_instance_uid, (
                    f"{'frame ' + str(plane.frame) + ': ' if plane.multiframe else ''}{what} "
                    f"{key[0] if key else ''}={value} shares slice positions with "
                    f"{kept_key[0] if kept_key else ''}={keep}, which was kept")))
        planes = by_value[keep]
        groups = _position_groups(planes, normal)
    dup = next((g for g in groups if len(g) > 1), None)
    if dup is not None:
        d = float(np.dot(dup[0].position, normal))
        labels = ", ".join(p.label for p in dup[:4])
        raise SeriesError(
            f"{len(dup)} images share the slice position {d:.4g} mm along the normal "
            f"({labels}) and no {', '.join(kw for _, kw, _ in SPLIT_ATTRIBUTES)} tells them "
            "apart: refusing to stack duplicates")
    return [g[0] for g in groups]


# --- geometry ----------------------------------------------------------------------------


def _geometry(planes: list[_Plane]) -> tuple[np.ndarray, dict[str, str]]:
    first = planes[0]
    row = np.asarray(first.orientation[:3], dtype=np.float64)
    col = np.asarray(first.orientation[3:], dtype=np.float64)
    if (abs(np.linalg.norm(row) - 1.0) > 1e-3 or abs(np.linalg.norm(col) - 1.0) > 1e-3
            or abs(float(np.dot(row, col))) > 1e-3):
        raise SeriesError(f"ImageOrientationPatient {_fmt(first.orientation)} of image "
                          f"{first.sop_instance_uid} is not two orthogonal unit vectors")
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.asarray([p.position for p in planes], dtype=np.float64)
    metadata: dict[str, str] = {}
    if len(planes) == 1:
        # One image has no measured step: take the nominal thickness, else 1 mm, along the normal.
        thickness = first.slice_thickness
        step_mm = thickness if thickness is not None and thickness > 0 else 1.0
        step = normal * step_mm
        metadata["slice_step_source"] = "SliceThickness" if step_mm == thickness else "1 mm default"
    else:
        steps = np.diff(positions, axis=0)
        step = (positions[-1] - positions[0]) / (len(planes) - 1)
        length = float(np.linalg.norm(step))
        tolerance = max(POSITION_TOLERANCE_MM, RELATIVE_SPACING_TOLERANCE * length)
        expected = positions[0] + np.arange(len(planes))[:, None] * step
        deviation = float(np.max(np.linalg.norm(positions - expected, axis=1)))
        step_deviation = float(np.max(np.linalg.norm(steps - step, axis=1)))
        if deviation > tolerance or step_deviation > tolerance:
            lengths = np.linalg.norm(steps, axis=1)
            lo, hi = float(lengths.min()), float(lengths.max())
            hint = " (a slice may be missing)" if hi > 1.5 * lo else ""
            raise SeriesError(f"irregular slice spacing: steps between {lo:.4g} and {hi:.4g} mm "
                              f"over {len(planes)} slices{hint}; slice positions deviate up to "
                              f"{max(deviation, step_deviation):.3g} mm from a regular grid")
        cos = abs(float(np.dot(step, normal))) / length
        tilt = math.degrees(math.acos(min(1.0, cos)))
        if tilt > TILT_REPORT_THRESHOLD_DEG:
            metadata["gantry_tilt_deg"] = f"{tilt:.3f}"
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col * first.pixel_spacing[0]
    affine[:3, 2] = row * first.pixel_spacing[1]
    affine[:3, 3] = positions[0]
    return affine, metadata


def _hints(ds: Dataset) -> dict[str, str]:
    """Non-identifying hints a model may use (never patient name, ID or dates)."""
    out: dict[str, str] = {}
    for keyword, key in _HINT_ATTRIBUTES:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        multi = isinstance(value, Sequence) and not isinstance(value, str)
        out[key] = "\\".join(str(v) for v in value) if multi else str(value)
    return out


# --- pixels ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pixels:
    """How one instance stores its pixels, read from its header before any decoding starts
    (decoding threads then never touch the dataset)."""

    sop_instance_uid: str
    file_name: str
    syntax: str
    #: Native-order dtype of the stored values (PixelRepresentation, BitsAllocated); None
    #: unless 8 or 16 bits allocated with 0 < BitsStored <= BitsAllocated.
    dtype: np.dtype[Any] | None
    signed: bool
    bits_stored: int
    photometric: str

    @property
    def monochrome1(self) -> bool:
        return self.photometric == "MONOCHROME1"

    def cannot_decode(self, exc: BaseException) -> SeriesError:
        return SeriesError(f"cannot decode the pixel data of image {self.sop_instance_uid} "
                           f"(file {self.file_name}): {scrub_text(str(exc))}")


def _pixels_of(ds: Dataset, path: Path) -> _Pixels:
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    regular = allocated in (8, 16) and 0 < stored <= allocated
    return _Pixels(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        file_name=path.name,
        syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        dtype=np.dtype(f"{'i' if signed else 'u'}{allocated // 8}") if regular else None,
        signed=signed,
        bits_stored=stored,
        photometric=str(ds.get("PhotometricInterpretation", "")),
    )


def _decode_jpeg_ls(data: bytes, pixels: _Pixels, shape: tuple[int, int]) -> np.ndarray:
    return imagecodecs.jpegls_decode(data)


def _decode_jpeg_lossless(data: bytes, pixels: _Pixels, shape: tuple[int, int]) -> np.ndarray:
    # libjpeg-turbo: also right where pylibjpeg-libjpeg gets a point transform wrong.
    return imagecodecs.jpeg8_decode(data)


def _decode_jpeg_2000(data: bytes, pixels: _Pixels, shape: tuple[int, int]) -> np.ndarray:
    return imagecodecs.jpeg2k_decode(data, numthreads=1)  # frames are already decoded in parallel


def _decode_rle(data: bytes, pixels: _Pixels, shape: tuple[int, int]) -> np.ndarray:
    assert pixels.dtype is not None  # only called for 8 or 16 bits allocated
    _check_rle_header(data, pixels.dtype.itemsize)
    return np.frombuffer(imagecodecs.dicomrle_decode(data, pixels.dtype),
                         dtype=pixels.dtype).reshape(shape)


def _check_rle_header(data: bytes, segments: int) -> None:
    """Refuse an RLE header whose segment count or offsets do not fit the frame: imagecodecs
    (2026.3) trusts the offsets and crashes the process on ones past the end (found by fuzzing)."""
    if len(data) < 64:
        raise ValueError(f"the RLE frame has {len(data)} bytes, less than its 64-byte header")
    count, *offsets = struct.unpack("<16L", data[:64])
    if count != segments:
        raise ValueError(f"the RLE header lists {count} segments, {segments} expected")
    bounds = [*offsets[:count], len(data)]
    if bounds[0] != 64 or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"the RLE segment offsets {offsets[:count]} do not lie in order inside "
                         f"the {len(data)}-byte frame")


#: Lossless (and JPEG-LS near-lossless, which decodes exactly) syntaxes decoded one frame at a
#: time by imagecodecs, which releases the GIL: frames decode in parallel threads.  Each
#: decoder returns the frame's stored bit patterns; :func:`_stored_values` interprets them.
#: Other syntaxes (lossy JPEG and JPEG 2000, big endian, deflate) go through pydicom.
_GIL_FREE_DECODERS: dict[str, Callable[[bytes, _Pixels, tuple[int, int]], np.ndarray]] = {
    JPEGLSLossless: _decode_jpeg_ls,
    JPEGLSNearLossless: _decode_jpeg_ls,
    JPEGLossless: _decode_jpeg_lossless,
    JPEGLosslessSV1: _decode_jpeg_lossless,
    JPEG2000Lossless: _decode_jpeg_2000,
    RLELossless: _decode_rle,
}


def _fill(out: np.ndarray, jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` (each writes its own slices of ``out``); the first failure in job order
    is raised, as a serial run would raise it, and the jobs not yet started are cancelled."""
    workers = min(DECODE_THREADS, len(jobs))
    if workers <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()


def _jobs(
    out: np.ndarray, file: _File, path: Path, slices: list[tuple[int, _Plane]]
) -> list[Callable[[], None]]:
    """Work that fills the ``slices`` (volume index, plane) of ``out`` from one file.  What the
    threads need from the header is gathered here: they never touch a dataset."""
    ds, pixels = file.dataset, file.pixels
    if file.location is None:
        return [partial(_decode_instance, out, ds, pixels, slices)]
    offset, length = file.location
    rows, columns = int(ds.Rows), int(ds.Columns)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.syntax in _LITTLE_ENDIAN_NATIVE:
        return [partial(_read_native, out, path, offset, length, (count, rows, columns), pixels, slices)]
    decoder = _GIL_FREE_DECODERS[pixels.syntax]
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    if count == 1:
        ((k, plane),) = slices  # a single-frame instance is one slice
        return [partial(_read_and_decode_frame, out[k], path, offset, offsets, decoder, pixels, plane)]
    # A multi-frame instance is split here so that its frames decode in parallel.
    frames = _encoded_frames(_read_from(path, offset, pixels), count, offsets, pixels)
    return [partial(_decode_frame, out[k], decoder, frames[plane.frame - 1], pixels, plane)
            for k, plane in slices]


def _read_from(path: Path, offset: int, pixels: _Pixels, size: int = -1) -> bytes:
    """``size`` bytes (all, if -1) of ``path`` from ``offset``."""
    try:
        with path.open("rb") as fp:
            fp.seek(offset)
            return fp.read(size)
    except OSError as exc:
        raise pixels.cannot_decode(exc) from exc


def _read_native(
    out: np.ndarray,
    path: Path,
    offset: int,
    length: int | None,
    shape: tuple[int, int, int],
    pixels: _Pixels,
    slices: list[tuple[int, _Plane]],
) -> None:
    assert pixels.dtype is not None  # native data are located only with 8 or 16 bits allocated
    count, rows, columns = shape
    expected = count * rows * columns * pixels.dtype.itemsize
    data = _read_from(path, offset, pixels, expected)
    if len(data) < expected or (length is not None and length < expected):
        held = len(data) if length is None else min(len(data), length)
        raise pixels.cannot_decode(ValueError(
            f"Pixel Data holds {held} bytes, {count} frame(s) of {rows}x{columns} need {expected}"
            + (" (the file ends there: it is truncated)" if len(data) < expected else "")))
    frames = np.frombuffer(data, dtype=pixels.dtype.newbyteorder("<"))
    _store_frames(out, frames.reshape((count, rows, columns) if count > 1 else (rows, columns)),
                  pixels, slices)


def _encoded_frames(
    data: bytes, count: int, offsets: tuple[bytes, bytes] | None, pixels: _Pixels
) -> list[bytes]:
    """The encoded bytes of each of the ``count`` frames of encapsulated pixel data."""
    try:
        frames = list(itertools.islice(
            generate_frames(data, number_of_frames=count, extended_offsets=offsets), count))
    except _DECODE_ERRORS as exc:
        raise pixels.cannot_decode(exc) from exc
    if len(frames) < count:
        raise pixels.cannot_decode(ValueError(f"{len(frames)} of {count} frames found in the "
                                              "encapsulated pixel data"))
    return frames


def _read_and_decode_frame(
    out: np.ndarray,
    path: Path,
    offset: int,
    offsets: tuple[bytes, bytes] | None,
    decoder: Callable[[bytes, _Pixels, tuple[int, int]], np.ndarray],
    pixels: _Pixels,
    plane: _Plane,
) -> None:
    (frame,) = _encoded_frames(_read_from(path, offset, pixels), 1, offsets, pixels)
    _decode_frame(out, decoder, frame, pixels, plane)


def _decode_frame(
    out: np.ndarray,
    decoder: Callable[[bytes, _Pixels, tuple[int, int]], np.ndarray],
    data: bytes,
    pixels: _Pixels,
    plane: _Plane,
) -> None:
    try:
        frame = decoder(data, pixels, (plane.rows, plane.columns))
    except _DECODE_ERRORS as exc:
        raise pixels.cannot_decode(exc) from exc
    _store(out, frame, pixels, plane)


def _decode_instance(
    out: np.ndarray, ds: Dataset, pixels: _Pixels, slices: list[tuple[int, _Plane]]
) -> None:
    """Decode a whole instance with pydicom (holds the GIL: one instance at a time)."""
    try:
        frames = np.asarray(pixel_array(ds))
    except _DECODE_ERRORS as exc:
        raise pixels.cannot_decode(exc) from exc
    _store_frames(out, frames, pixels, slices)


def _store_frames(
    out: np.ndarray, frames: np.ndarray, pixels: _Pixels, slices: list[tuple[int, _Plane]]
) -> None:
    for k, plane in slices:
        _store(out[k], frames[plane.frame - 1] if frames.ndim == 3 else frames, pixels, plane)


def _store(out: np.ndarray, frame: np.ndarray, pixels: _Pixels, plane: _Plane) -> None:
    """Write one frame's rescaled values into its slice ``out`` of the volume."""
    if frame.shape != (plane.rows, plane.columns):
        raise SeriesError(f"frame {plane.frame} of image {plane.sop_instance_uid} has "
                          f"shape {frame.shape}, expected {plane.rows}x{plane.columns}")
    frame = _stored_values(frame, pixels)
    if pixels.monochrome1:
        frame = _invert_monochrome1(frame, pixels)
    _rescale_into(out, frame, plane.slope, plane.intercept)


def _stored_values(frame: np.ndarray, pixels: _Pixels) -> np.ndarray:
    """The stored values of ``frame``: its bit patterns read with the instance's dtype, with
    the bits above BitsStored ignored (old scanners kept overlays there) and the sign taken
    from the stored high bit.  Decoders do not agree on these (JPEG-LS and JPEG lossless carry
    no sign; pydicom leaves JPEG-LS high bits as they were), so it is done here for all."""
    dtype = pixels.dtype
    if dtype is None or frame.dtype.kind not in "iu":
        return frame
    if not frame.dtype.isnative:
        frame = frame.astype(frame.dtype.newbyteorder("="))
    if frame.dtype != dtype:
        frame = frame.view(dtype) if frame.dtype.itemsize == dtype.itemsize else frame.astype(dtype)
    shift = 8 * dtype.itemsize - pixels.bits_stored
    if shift == 0:
        return frame
    if pixels.signed:
        return np.asarray((frame << shift) >> shift)
    return np.asarray(frame & dtype.type((1 << pixels.bits_stored) - 1))


def _rescale_into(out: np.ndarray, frame: np.ndarray, slope: float, intercept: float) -> None:
    """``out = frame * slope + intercept`` in float32, in as few passes as the values allow."""
    if slope == 1.0:
        np.add(frame, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
        return
    np.multiply(frame, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)


def _invert_monochrome1(frame: np.ndarray, pixels: _Pixels) -> np.ndarray:
    """Mirror stored values within the stored range so that larger means brighter."""
    wide = frame.astype(np.int32 if frame.dtype.itemsize <= 2 else np.int64)
    if pixels.signed:
        # Signed range [-2^(b-1), 2^(b-1)-1] maps onto itself by v -> -1 - v.
        return np.asarray(-1 - wide)
    return np.asarray((1 << (pixels.bits_stored or 16)) - 1 - wide)
