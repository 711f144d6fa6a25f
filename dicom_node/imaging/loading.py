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
7. pixel data are decoded straight into the volume in a thread pool
   (:mod:`dicom_node.imaging.pixels`; compressed lossless frames by imagecodecs, which
   releases the GIL), the bits above BitsStored are ignored, MONOCHROME1
   is inverted within the stored bit range, and the per-image rescale slope/intercept is applied.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.imaging.errors import SeriesError as SeriesError  # re-exported: the loader's error
from dicom_node.imaging.pixels import (
    PIXEL_KEYWORDS,
    READ_ERRORS,
    PixelLayout,
    decode_jobs,
    fill,
    pixel_data_location,
    pixel_layout,
)
from dicom_node.imaging.planes import (
    SPLIT_ATTRIBUTES,
    Plane,
    enhanced_planes,
    is_localizer,
    single_plane,
)
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
#: Non-identifying attributes copied into ``Volume.metadata`` (keyword, metadata key).
_HINT_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("BodyPartExamined", "body_part"),
    ("SeriesDescription", "series_description"),
    ("Manufacturer", "manufacturer"),
    ("PatientPosition", "patient_position"),
    ("ConvolutionKernel", "convolution_kernel"),
)


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
    planes: list[Plane] = []
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
    slices_of: dict[int, list[tuple[int, Plane]]] = {}
    for k, plane in enumerate(planes):
        slices_of.setdefault(plane.source, []).append((k, plane))
    array = np.empty((len(planes), planes[0].rows, planes[0].columns), dtype=np.float32)
    # Every job reads its pixel data from the file and writes its own slices straight into the
    # volume: peak memory stays near the output volume plus a frame or an instance per thread.
    _fill_volume(array, files, paths, used, slices_of)
    inverted = any(files[i].pixels.monochrome1 for i in used)
    if inverted:
        metadata["photometric"] = "MONOCHROME1 inverted"

    source_index = {src: i for i, src in enumerate(used)}
    sources = [datasets[i] for i in used]
    for ds in sources:
        for keyword in PIXEL_KEYWORDS:
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
    pixels: PixelLayout
    #: (offset, length) of the Pixel Data value in the file, read later by a decoding thread;
    #: length None is undefined (encapsulated).  None when ``dataset`` holds the pixel data
    #: (read with the header for pydicom to decode) or the file has none.
    location: tuple[int, int | None] | None

    @property
    def has_pixels(self) -> bool:
        return self.location is not None or any(k in self.dataset for k in PIXEL_KEYWORDS)


def _read_one(path: Path) -> _File:
    try:
        with path.open("rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            start = fp.tell()
            head = fp.read(12)
        pixels = pixel_layout(ds, path)
        location = pixel_data_location(pixels, start, head)
        if location is None and (head or pixels.syntax == DeflatedExplicitVRLittleEndian):
            # Pixel data only pydicom decodes (or finds, in a deflated file): read it all.
            ds = pydicom.dcmread(path)
    except READ_ERRORS as exc:
        raise SeriesError(f"cannot read file {path.name} of the series: {scrub_text(str(exc))}") from exc
    return _File(dataset=ds, pixels=pixels, location=location)


def _fill_volume(
    array: np.ndarray,
    files: list[_File],
    paths: Sequence[Path],
    used: list[int],
    slices_of: dict[int, list[tuple[int, Plane]]],
) -> None:
    fill(array, [job for i in used for job in decode_jobs(
        array, files[i].dataset, files[i].pixels, files[i].location, Path(paths[i]), slices_of[i])])


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


def _planes_of(
    index: int, file: _File, path: Path, excluded: list[tuple[str, str]]
) -> list[Plane]:
    ds = file.dataset
    sop = str(ds.SOPInstanceUID)
    if not file.has_pixels:
        sop_class = UID(str(ds.SOPClassUID))
        if "Image Storage" in sop_class.name or "Rows" in ds:
            raise SeriesError(f"image {sop} (file {path.name}) has no pixel data: the file is "
                              "truncated or incomplete")
        excluded.append((sop, f"not an image ({sop_class.name or sop_class})"))
        return []
    if is_localizer(ds.get("ImageType")):
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
        return enhanced_planes(index, ds, excluded)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(f"image {sop} has {frames} frames but no per-frame functional groups "
                          "(PerFrameFunctionalGroupsSequence): the position of each frame is "
                          "unknown")
    return [single_plane(index, ds, sop)]


# --- stack selection ---------------------------------------------------------------------


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _main_orientation(planes: list[Plane], excluded: list[tuple[str, str]]) -> list[Plane]:
    groups: list[list[Plane]] = []
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


def _check_matrix(planes: list[Plane]) -> None:
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


def _position_groups(planes: list[Plane], normal: np.ndarray) -> list[list[Plane]]:
    """Planes sorted along the normal, grouped when they share a position."""
    ordered = sorted(planes, key=lambda p: float(np.dot(p.position, normal)))
    groups: list[list[Plane]] = []
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


def _sorted_unique_positions(planes: list[Plane], excluded: list[tuple[str, str]]) -> list[Plane]:
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
        by_value: dict[str, list[Plane]] = {}
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


def _geometry(planes: list[Plane]) -> tuple[np.ndarray, dict[str, str]]:
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
