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
   kept exactly in the affine); otherwise the spacing is refused, never averaged away;
7. pixel data are decoded (compressed ones in a thread pool), MONOCHROME1 is inverted within the
   stored bit range, and the per-image rescale slope/intercept is applied.
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from dicom_node.errors import PermanentError
from inference.volume import Volume

#: Two positions closer than this (mm, along the slice normal) are "the same position".
POSITION_TOLERANCE_MM = 0.01
#: Slice positions may deviate from the regular grid by max(this fraction of a step, 0.01 mm).
RELATIVE_SPACING_TOLERANCE = 0.01
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
#: Non-identifying attributes copied into ``Volume.metadata`` (keyword, metadata key).
_HINT_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("BodyPartExamined", "body_part"),
    ("SeriesDescription", "series_description"),
    ("Manufacturer", "manufacturer"),
    ("PatientPosition", "patient_position"),
    ("ConvolutionKernel", "convolution_kernel"),
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Native data decode in microseconds; a pool only pays off for compressed frames.
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                              "1.2.840.10008.1.2.1.99"})
_LITTLE_ENDIAN_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
#: Decoder plugin to use first where several are installed (measured: CharLS via pyjpegls
#: decodes JPEG-LS about twice as fast as libjpeg via pylibjpeg).
_PREFERRED_PLUGINS = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}
#: Threads decoding compressed instances (only useful where the codec releases the GIL).
DECODE_THREADS = min(8, os.cpu_count() or 1)


class SeriesError(PermanentError):
    """The series cannot be turned into one volume; the message says why."""


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
        raise SeriesError(f"the series holds malformed data: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _load(paths: Sequence[Path], modality_hint: str | None) -> LoadedSeries:
    datasets = _read_all([Path(p) for p in paths])
    _check_identity(datasets, [Path(p) for p in paths])
    modality = _modality(datasets, modality_hint)

    excluded: list[tuple[str, str]] = []
    planes: list[_Plane] = []
    for index, (ds, path) in enumerate(zip(datasets, paths, strict=True)):
        planes.extend(_planes_of(index, ds, Path(path), excluded))
    if not planes:
        reasons = "; ".join(sorted({r for _, r in excluded})) or "no images"
        raise SeriesError(f"no image of the series can form a volume ({reasons})")

    planes = _main_orientation(planes, excluded)
    _check_matrix(planes)
    planes = _sorted_unique_positions(planes, excluded)
    affine, metadata = _geometry(planes)
    metadata.update(_hints(datasets[planes[0].source]))

    used = list(dict.fromkeys(p.source for p in planes))
    slices_of: dict[int, list[tuple[int, _Plane]]] = {}
    for k, plane in enumerate(planes):
        slices_of.setdefault(plane.source, []).append((k, plane))
    array = np.empty((len(planes), planes[0].rows, planes[0].columns), dtype=np.float32)
    inverted = False
    # Each instance is decoded, copied into its slices and dropped: peak memory stays near
    # the output volume plus the encoded files.
    for source, frames in _decode(datasets, used, [Path(paths[i]) for i in used]):
        ds = datasets[source]
        monochrome1 = ds.get("PhotometricInterpretation") == "MONOCHROME1"
        inverted |= monochrome1
        for k, plane in slices_of[source]:
            frame = frames[plane.frame - 1] if frames.ndim == 3 else frames
            if frame.shape != (plane.rows, plane.columns):
                raise SeriesError(f"frame {plane.frame} of image {plane.sop_instance_uid} has "
                                  f"shape {frame.shape}, expected {plane.rows}x{plane.columns}")
            if monochrome1:
                frame = _invert_monochrome1(frame, ds)
            _rescale_into(array[k], frame, plane.slope, plane.intercept)
    if inverted:
        metadata["photometric"] = "MONOCHROME1 inverted"

    source_index = {src: i for i, src in enumerate(used)}
    sources = [datasets[i] for i in used]
    for ds in sources:
        for keyword in _PIXEL_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
    frame_refs = [(source_index[p.source], p.frame) for p in planes]
    volume = Volume(array=array, affine=affine, modality=modality, metadata=metadata)
    return LoadedSeries(volume=volume, sources=sources, frame_refs=frame_refs, excluded=excluded)


# --- reading -----------------------------------------------------------------------------


def _read_one(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except _READ_ERRORS as exc:
        raise SeriesError(f"cannot read file {path.name} of the series: {exc}") from exc


def _read_all(paths: list[Path]) -> list[Dataset]:
    # Reading overlaps I/O with parsing; headers are parsed exactly once here.
    workers = min(8, os.cpu_count() or 1, len(paths))
    if workers <= 1:
        return [_read_one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_read_one, paths))


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
    index: int, ds: Dataset, path: Path, excluded: list[tuple[str, str]]
) -> list[_Plane]:
    sop = str(ds.SOPInstanceUID)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
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


def _native_frames(ds: Dataset) -> np.ndarray | None:
    """Little-endian native pixels as a zero-copy view, or None to let pydicom decode them."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (syntax not in _LITTLE_ENDIAN_NATIVE or allocated not in (8, 16) or "PixelData" not in ds
            or not 0 < stored <= allocated):
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    data = ds.PixelData
    if len(data) < frames * rows * columns * dtype.itemsize:
        return None  # pydicom's decoder reports the truncation in its own words
    arr = np.frombuffer(data, dtype=dtype, count=frames * rows * columns)
    if stored < allocated:
        # Bits above BitsStored are not part of the value (old scanners kept overlays there):
        # mask them, then sign-extend from the stored high bit.
        shift = allocated - stored
        arr = (arr << shift) >> shift if signed else arr & dtype.type((1 << stored) - 1)
    return arr.reshape((frames, rows, columns) if frames > 1 else (rows, columns))


def _decode_one(ds: Dataset, path: Path) -> np.ndarray:
    native = _native_frames(ds)
    if native is not None:
        return native
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    plugin = _PREFERRED_PLUGINS.get(syntax, "")
    try:
        if plugin and plugin not in get_decoder(UID(syntax)).available_plugins:
            plugin = ""
        return np.asarray(pixel_array(ds, decoding_plugin=plugin))
    except _READ_ERRORS as exc:
        raise SeriesError(f"cannot decode the pixel data of image {ds.SOPInstanceUID} (file "
                          f"{path.name}): {exc}") from exc


def _decode(
    datasets: list[Dataset], used: list[int], paths: list[Path]
) -> Iterator[tuple[int, np.ndarray]]:
    """(source index, pixels) for every used instance, in ``used`` order."""
    jobs = list(zip(used, paths, strict=True))
    compressed = sum(
        str(datasets[i].file_meta.get("TransferSyntaxUID", "")) not in _NATIVE_SYNTAXES
        for i in used)
    workers = min(DECODE_THREADS, compressed)

    def task(job: tuple[int, Path]) -> tuple[int, np.ndarray]:
        return job[0], _decode_one(datasets[job[0]], job[1])

    if workers <= 1:
        yield from map(task, jobs)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(task, jobs)


def _rescale_into(out: np.ndarray, frame: np.ndarray, slope: float, intercept: float) -> None:
    """``out = frame * slope + intercept`` in float32, in as few passes as the values allow."""
    if slope == 1.0:
        np.add(frame, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
        return
    np.multiply(frame, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)


def _invert_monochrome1(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Mirror stored values within the stored range so that larger means brighter."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        # Signed range [-2^(b-1), 2^(b-1)-1] maps onto itself by v -> -1 - v.
        return np.asarray(-1 - frame.astype(np.int64))
    return np.asarray((1 << bits) - 1 - frame.astype(np.int64))
