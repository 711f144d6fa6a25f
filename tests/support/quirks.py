"""Scanner quirks applied to synthetic phantom series, for the loader's tests and benchmark.

Every generator starts from :mod:`dicom_node.demo` (known HU and geometry) and
reproduces one thing real scanners send: shuffled or reversed InstanceNumbers, feet-first
stacks, gantry tilt, gaps and irregular steps, duplicated slices, echoes, localizers, reformats,
enhanced multi-frame objects, compressed transfer syntaxes, 12-bit signed/unsigned pixels,
MONOCHROME1, per-slice rescale, missing attributes and damaged files.  Dataset generators return
new lists and leave their input untouched where that matters for a test's reference.
"""

from __future__ import annotations

import copy
import math
import random
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.demo import (
    ChestSpec,
    Phantom,
    SeriesInfo,
    axial_affine,
    make_chest_phantom,
    slice_datasets,
)
from tests.support import procs

#: DCMTK command line per codec name: (tool, options).  All are lossless.
DCMTK_CODECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jpeg-lossless-sv1": ("dcmcjpeg", ("+e1",)),  # JPEG process 14, selection value 1
    "jpeg-ls-lossless": ("dcmcjpls", ("+el",)),
    "rle": ("dcmcrle", ()),
}


def uid(*parts: str) -> str:
    """A deterministic UID under the 2.25 root (a name-based UUID of ``parts``)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(('dicom-node-quirks', *parts))).int}"


def series_info(seed: str = "quirks", **overrides: object) -> SeriesInfo:
    """A :class:`SeriesInfo` whose study, series and frame of reference UIDs come from ``seed``."""
    fields: dict[str, object] = {
        "seed": seed,
        "study_uid": uid(seed, "study"),
        "series_uid": uid(seed, "series"),
        "frame_of_reference_uid": uid(seed, "for"),
    }
    fields.update(overrides)
    return SeriesInfo(**fields)  # type: ignore[arg-type]


def small_phantom(slices: int = 12, size: int = 32, pixel_spacing: float = 10.0,
                  slice_spacing: float = 5.0, seed: int = 0) -> Phantom:
    """A chest phantom small enough for a unit test (whole body inside the field of view)."""
    return make_chest_phantom(ChestSpec(rows=size, columns=size, slices=slices,
                                        pixel_spacing=pixel_spacing, slice_spacing=slice_spacing,
                                        seed=seed))


def stored_hu(hu: np.ndarray) -> np.ndarray:
    """The HU a lossless reader must return for ``hu`` written by ``slice_datasets`` (CT)."""
    return (np.clip(np.round(hu + 1024.0), -32768, 32767) - 1024.0).astype(np.float32)


def renumber_uids(datasets: Sequence[Dataset], seed: str) -> list[Dataset]:
    """Give every dataset a deterministic SOPInstanceUID derived from ``seed`` and its index."""
    out = []
    for k, ds in enumerate(datasets):
        sop = uid(seed, "sop", str(k))
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        out.append(ds)
    return out


def stack(hu: np.ndarray, affine: np.ndarray, info: SeriesInfo | None = None) -> list[Dataset]:
    """Single-frame datasets of ``hu`` on ``affine`` with deterministic UIDs."""
    info = info or series_info()
    return renumber_uids(slice_datasets(hu, affine, info), info.seed)


# --- ordering and geometry ---------------------------------------------------------------


def shuffle_instance_numbers(datasets: Sequence[Dataset], seed: int = 0) -> list[Dataset]:
    """Shuffle InstanceNumber values and the list order, so neither follows the anatomy."""
    rng = random.Random(seed)  # noqa: S311 -- reproducible test order, not cryptography
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    rng.shuffle(numbers)
    out = list(datasets)
    for ds, number in zip(out, numbers, strict=True):
        ds.InstanceNumber = number
    rng.shuffle(out)
    return out


def reverse_instance_numbers(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Number slices head -> feet (InstanceNumber 1 is the most superior slice)."""
    n = len(datasets)
    for ds in datasets:
        ds.InstanceNumber = n + 1 - int(ds.InstanceNumber)
    return list(datasets)


def feet_first_affine(
    shape: Sequence[int], pixel_spacing: float, slice_spacing: float
) -> np.ndarray:
    """Affine of a feet-first supine axial stack: rows run to patient right (-x), slices go
    head -> feet, so the slice normal (row x column) points to the feet."""
    affine = axial_affine(shape, pixel_spacing, slice_spacing)
    slices, _, cols = shape
    origin = affine[:3, 3].copy()
    affine[:3, 2] = (-pixel_spacing, 0.0, 0.0)
    affine[:3, 0] = (0.0, 0.0, -slice_spacing)
    affine[:3, 3] = (origin[0] + (cols - 1) * pixel_spacing, origin[1],
                     origin[2] + (slices - 1) * slice_spacing)
    return affine


def tilted_affine(shape: Sequence[int], pixel_spacing: float, slice_spacing: float,
                  tilt_deg: float) -> np.ndarray:
    """Affine of a gantry-tilted acquisition: image planes tilted about x by ``tilt_deg`` while
    the table (and so ImagePositionPatient) moves along z, i.e. a sheared slice axis."""
    affine = axial_affine(shape, pixel_spacing, slice_spacing)
    t = math.radians(tilt_deg)
    affine[:3, 1] = (0.0, pixel_spacing * math.cos(t), -pixel_spacing * math.sin(t))
    return affine


def with_positions(datasets: Sequence[Dataset], positions: np.ndarray) -> list[Dataset]:
    """Overwrite ImagePositionPatient (and SliceLocation) with ``positions`` (n, 3) in mm."""
    for ds, pos in zip(datasets, positions, strict=True):
        ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
        ds.SliceLocation = f"{pos[2]:.6g}"
    return list(datasets)


def irregular_positions(affine: np.ndarray, steps_mm: Sequence[float]) -> np.ndarray:
    """Positions starting at the affine origin, moving along its slice axis by ``steps_mm``."""
    axis = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    offsets = np.concatenate([[0.0], np.cumsum(steps_mm)])
    return np.asarray(affine[:3, 3] + offsets[:, None] * axis)


def stacked_positions(affine: np.ndarray, counts: Sequence[int], spacings: Sequence[float],
                      boundaries: Sequence[float] | None = None) -> np.ndarray:
    """Positions of consecutive regular stacks along the affine's slice axis (one series of
    several spacings, as a head CT's posterior fossa and cerebrum stacks): ``counts[i]``
    slices ``spacings[i]`` apart, each stack ``boundaries[i]`` mm after the last slice of the
    one before (default: the mean of the two spacings, i.e. contiguous slabs)."""
    steps: list[float] = []
    for i, (count, spacing) in enumerate(zip(counts, spacings, strict=True)):
        if i > 0:
            steps.append(boundaries[i - 1] if boundaries is not None
                         else (spacings[i - 1] + spacing) / 2.0)
        steps.extend([spacing] * (count - 1))
    return irregular_positions(affine, steps)


def drop(datasets: Sequence[Dataset], *indices: int) -> list[Dataset]:
    """The datasets without those at ``indices`` (a missing slice)."""
    gone = set(indices)
    return [ds for k, ds in enumerate(datasets) if k not in gone]


# --- duplicates, echoes, localizers, reformats -------------------------------------------


def duplicate(ds: Dataset, seed: str, transfer_syntax: UID | None = None) -> Dataset:
    """The same image stored again under a new SOPInstanceUID, optionally recompressed
    (a PACS that re-sent one slice in another transfer syntax)."""
    dup = copy.deepcopy(ds)
    sop = uid(seed, "duplicate", str(ds.SOPInstanceUID))
    dup.SOPInstanceUID = sop
    dup.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    if transfer_syntax is not None:
        dup.compress(transfer_syntax)
    return dup


def multi_echo(
    hu: np.ndarray, affine: np.ndarray, info: SeriesInfo, echoes: int = 2
) -> list[Dataset]:
    """An MR dual-echo series: every position once per echo (EchoNumbers 1..n); echo ``e``
    has its values divided by ``e`` so the echoes are told apart by content too."""
    out: list[Dataset] = []
    for e in range(1, echoes + 1):
        datasets = renumber_uids(slice_datasets(hu / e, affine, info), f"{info.seed}-echo{e}")
        for ds in datasets:
            ds.EchoNumbers = e
            ds.EchoTime = f"{10 * e}"
            ds.InstanceNumber = int(ds.InstanceNumber) + (e - 1) * len(datasets)
        out.extend(datasets)
    return out


def second_acquisition(
    datasets: Sequence[Dataset], indices: Sequence[int], seed: str
) -> list[Dataset]:
    """Repeat the slices at ``indices`` as AcquisitionNumber 2 (a partial rescan)."""
    extra = []
    for k in indices:
        dup = duplicate(datasets[k], f"{seed}-acq2")
        dup.AcquisitionNumber = 2
        extra.append(dup)
    return list(datasets) + extra


def localizer(info: SeriesInfo, seed: str, rows: int = 40, columns: int = 24) -> Dataset:
    """A coronal scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) of another matrix size."""
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 1.0, 0.0)
    affine[:3, 1] = (0.0, 0.0, -10.0)
    affine[:3, 2] = (10.0, 0.0, 0.0)
    affine[:3, 3] = (-120.0, 0.0, 200.0)
    hu = np.full((1, rows, columns), -500.0, dtype=np.float32)
    ds = renumber_uids(slice_datasets(hu, affine, info), f"{seed}-localizer")[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1000
    return ds


def sagittal_reformats(info: SeriesInfo, seed: str, count: int, size: int) -> list[Dataset]:
    """``count`` sagittal images (DERIVED, no LOCALIZER flag) mixed into an axial series."""
    affine = np.eye(4)
    affine[:3, 0] = (10.0, 0.0, 0.0)
    affine[:3, 1] = (0.0, 0.0, -5.0)
    affine[:3, 2] = (0.0, 10.0, 0.0)
    affine[:3, 3] = (-20.0, -150.0, 100.0)
    hu = np.zeros((count, size, size), dtype=np.float32)
    datasets = renumber_uids(slice_datasets(hu, affine, info), f"{seed}-sagittal")
    for k, ds in enumerate(datasets):
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.InstanceNumber = 2000 + k
    return datasets


# --- matrix and pixel encodings ----------------------------------------------------------


def with_matrix(ds: Dataset, rows: int, columns: int) -> Dataset:
    """Crop (or zero-pad) the image to ``rows`` x ``columns`` (an odd-sized slice)."""
    src = ds.pixel_array
    out = np.zeros((rows, columns), dtype=src.dtype)
    r, c = min(rows, src.shape[0]), min(columns, src.shape[1])
    out[:r, :c] = src[:r, :c]
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = out.tobytes()
    return ds


def bits_stored_12(datasets: Sequence[Dataset], *, signed: bool,
                   high_bit_garbage: bool = False) -> list[Dataset]:
    """Re-encode CT slices as 12 bits stored in 16 allocated, signed (HU, intercept 0) or
    unsigned (HU + 1024, intercept -1024); optionally set the 4 unused high bits of unsigned
    pixels, as old scanners did with overlays."""
    for ds in datasets:
        hu = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ds.BitsStored, ds.HighBit = 12, 11
        if signed:
            ds.PixelData = np.clip(np.round(hu), -2048, 2047).astype(np.int16).tobytes()
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "0"
        else:
            raw = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16)
            ds.PixelData = (raw | np.uint16(0xA000) if high_bit_garbage else raw).tobytes()
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = "-1024"
    return list(datasets)


def monochrome1(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Store every slice as MONOCHROME1 (stored value v becomes -1 - v in the signed 16-bit
    range) so that the displayed image, and a correct reader's output, are unchanged."""
    for ds in datasets:
        arr = ds.pixel_array.astype(np.int32)
        ds.PixelData = (-1 - arr).astype(np.int16).tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
    return list(datasets)


#: (slope, intercept) cycled over the slices by :func:`per_slice_rescale`.
RESCALES: tuple[tuple[float, float], ...] = ((0.5, -1024.0), (0.25, -1000.0), (1.0, -2048.0),
                                             (2.0, -1024.0))


def per_slice_rescale(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Give consecutive slices different RescaleSlope/RescaleIntercept (some non-1) keeping the
    same HU; HU are rounded to even integers so every (slope, intercept) represents them."""
    for k, ds in enumerate(datasets):
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hu = 2.0 * np.round(hu / 2.0)
        slope, intercept = RESCALES[k % len(RESCALES)]
        ds.PixelData = np.round((hu - intercept) / slope).astype(np.int16).tobytes()
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
    return list(datasets)


def compress(datasets: Sequence[Dataset], transfer_syntax: UID) -> list[Dataset]:
    """Compress with pydicom's encoders (RLE Lossless natively; JPEG 2000 through openjpeg,
    which needs images of at least 32x32)."""
    for ds in datasets:
        ds.compress(transfer_syntax)
    return list(datasets)


def dcmtk_compress(paths: Sequence[Path], out_dir: Path, codec: str) -> list[Path]:
    """Compress files with a DCMTK encoder (``DCMTK_CODECS``), one output file per input."""
    tool, options = DCMTK_CODECS[codec]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = out_dir / path.name
        procs.run_tool([tool, *options, str(path), str(target)], check=True)
        out.append(target)
    return out


def enhanced(datasets: Sequence[Dataset], seed: str, *, shuffle_seed: int | None = None) -> Dataset:
    """One Legacy Converted Enhanced CT/MR instance (highdicom) holding every slice as a frame;
    with ``shuffle_seed`` the frames are in a random order (no dimension index)."""
    legacy = list(datasets)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(legacy)  # noqa: S311 -- reproducible test order
    cls = (LegacyConvertedEnhancedCTImage if legacy[0].Modality == "CT"
           else LegacyConvertedEnhancedMRImage)
    return cls(legacy, series_instance_uid=str(legacy[0].SeriesInstanceUID), series_number=3,
               sop_instance_uid=uid(seed, "enhanced"), instance_number=1,
               include_dimension_index=shuffle_seed is None)


#: Where :func:`functional_group_layout` puts (Pixel Measures, Plane Orientation): "shared",
#: "per-frame" (both in every frame's item, as Siemens XA enhanced MR) or "mixed".
GROUP_LAYOUTS: dict[str, tuple[bool, bool]] = {
    "shared": (False, False),
    "per-frame": (True, True),
    "mixed": (True, False),
}


def functional_group_layout(ds: Dataset, layout: str) -> Dataset:
    """Move the Pixel Measures and Plane Orientation functional groups of an enhanced image
    between the shared item and every per-frame item, as ``GROUP_LAYOUTS[layout]`` says (the
    standard allows either place; a group is in exactly one of them)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    for keyword, to_frames in zip(("PixelMeasuresSequence", "PlaneOrientationSequence"),
                                  GROUP_LAYOUTS[layout], strict=True):
        item = shared[keyword].value[0] if keyword in shared else per_frame[0][keyword].value[0]
        for frame in per_frame:
            if keyword in frame:
                delattr(frame, keyword)
            if to_frames:
                setattr(frame, keyword, [copy.deepcopy(item)])
        if keyword in shared:
            delattr(shared, keyword)
        if not to_frames:
            setattr(shared, keyword, [item])
    return ds


# --- missing attributes and damaged files ------------------------------------------------


TYPE2_REMOVED = ("PatientBirthDate", "PatientSex", "SliceThickness", "SliceLocation")


def without(datasets: Sequence[Dataset], *keywords: str, index: int | None = None) -> list[Dataset]:
    """Delete ``keywords`` from every dataset (or only the one at ``index``)."""
    for k, ds in enumerate(datasets):
        if index is None or k == index:
            for keyword in keywords:
                if keyword in ds:
                    delattr(ds, keyword)
    return list(datasets)


def truncate(path: Path, keep_bytes: int) -> Path:
    """Cut a written file to its first ``keep_bytes`` bytes (an interrupted transfer)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    return path


def garbage_file(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """A file of random bytes where a DICOM file was expected."""
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path
