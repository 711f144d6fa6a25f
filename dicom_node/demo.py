"""Synthetic phantoms with known ground truth, written as real DICOM series.

Used by the tests and the benchmarks (seeded, so every run sees the same data).  The chest
phantom has a body (elliptic cylinder with a fat rim), two lungs (ellipsoids), a spine
(cylinder) and optional spherical nodules; every structure has an analytic volume, and the
image is rendered with 2x2x2 supersampling so edges have partial-volume values like a scanner's.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from dicom_node.uids import derived_uid

AIR_HU = -1000.0
LUNG_HU = -850.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 700.0
NODULE_HU = 30.0


@dataclass(frozen=True)
class Sphere:
    """A spherical nodule: centre in LPS mm, diameter in mm."""

    centre: tuple[float, float, float]
    diameter_mm: float
    hu: float = NODULE_HU

    @property
    def volume_ml(self) -> float:
        return float(np.pi / 6.0 * self.diameter_mm**3 / 1000.0)


@dataclass(frozen=True)
class ChestSpec:
    """Size and content of a chest phantom (defaults: small and fast for tests)."""

    rows: int = 96
    columns: int = 96
    slices: int = 48
    pixel_spacing: float = 3.5
    slice_spacing: float = 5.0
    #: Body ellipse semi-axes (x = left-right, y = anterior-posterior) in mm.
    body_axes: tuple[float, float] = (150.0, 110.0)
    fat_rim_mm: float = 12.0
    #: Lung ellipsoid semi-axes (x, y, z) in mm; lungs sit at x = +/- lung_offset_x.
    lung_axes: tuple[float, float, float] = (45.0, 60.0, 90.0)
    lung_offset_x: float = 70.0
    spine_radius: float = 15.0
    spine_y: float = 75.0
    nodules: tuple[Sphere, ...] = ()
    noise_hu: float = 10.0
    seed: int = 0


@dataclass
class Phantom:
    """Rendered phantom: HU image, exact geometry and ground truth."""

    hu: np.ndarray
    affine: np.ndarray
    #: Boolean masks at voxel centres (``body``, ``lungs``, ``bone``, ``fat``, ``nodule_<i>``).
    masks: dict[str, np.ndarray]
    #: Analytic volumes in ml of the same structures.
    volumes_ml: dict[str, float]
    spec: ChestSpec
    nodules: tuple[Sphere, ...] = field(default_factory=tuple)

    @property
    def spacing(self) -> tuple[float, float, float]:
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))


def axial_affine(shape: Sequence[int], pixel_spacing: float, slice_spacing: float, centre_z: float = 0.0) -> np.ndarray:
    """Affine of an axial stack centred on (0, 0, centre_z), slices going feet -> head."""
    slices, rows, cols = shape
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, slice_spacing)
    affine[:3, 1] = (0.0, pixel_spacing, 0.0)
    affine[:3, 2] = (pixel_spacing, 0.0, 0.0)
    affine[:3, 3] = (
        -(cols - 1) / 2.0 * pixel_spacing,
        -(rows - 1) / 2.0 * pixel_spacing,
        centre_z - (slices - 1) / 2.0 * slice_spacing,
    )
    return affine


def _structures(spec: ChestSpec, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    ax, ay = spec.body_axes
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0
    inner = (x / (ax - spec.fat_rim_mm)) ** 2 + (y / (ay - spec.fat_rim_mm)) ** 2 <= 1.0
    lx, ly, lz = spec.lung_axes
    lungs = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
    for sign in (-1.0, 1.0):
        lungs |= ((x - sign * spec.lung_offset_x) / lx) ** 2 + (y / ly) ** 2 + (z / lz) ** 2 <= 1.0
    bone = (x**2 + (y - spec.spine_y) ** 2 <= spec.spine_radius**2) & body
    out = {
        "body": np.broadcast_to(body, lungs.shape),
        "inner": np.broadcast_to(inner, lungs.shape),
        "lungs": lungs & np.broadcast_to(inner, lungs.shape),
        "bone": np.broadcast_to(bone, lungs.shape),
    }
    for i, nod in enumerate(spec.nodules):
        cx, cy, cz = nod.centre
        out[f"nodule_{i}"] = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= (nod.diameter_mm / 2.0) ** 2
    return out


def _render(spec: ChestSpec, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    s = _structures(spec, x, y, z)
    img = np.full(s["lungs"].shape, AIR_HU, dtype=np.float32)
    img[s["body"]] = FAT_HU
    img[s["inner"]] = SOFT_TISSUE_HU
    img[s["lungs"]] = LUNG_HU
    img[s["bone"]] = BONE_HU
    for i, nod in enumerate(spec.nodules):
        img[s[f"nodule_{i}"] & s["body"]] = nod.hu
    return img


def make_chest_phantom(spec: ChestSpec | None = None) -> Phantom:
    """Render a chest phantom with known lung, body, bone and nodule volumes."""
    spec = spec or ChestSpec()
    shape = (spec.slices, spec.rows, spec.columns)
    affine = axial_affine(shape, spec.pixel_spacing, spec.slice_spacing)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij", sparse=True)

    def coords(dk: float, dj: float, di: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = affine[0, 3] + (i + di) * spec.pixel_spacing
        y = affine[1, 3] + (j + dj) * spec.pixel_spacing
        z = affine[2, 3] + (k + dk) * spec.slice_spacing
        return x, y, z

    acc = np.zeros(shape, dtype=np.float32)
    offsets = (-0.25, 0.25)
    for dk in offsets:
        for dj in offsets:
            for di in offsets:
                acc += _render(spec, *coords(dk, dj, di))
    hu = acc / 8.0
    rng = np.random.default_rng(spec.seed)
    if spec.noise_hu > 0:
        hu += rng.normal(0.0, spec.noise_hu, size=shape).astype(np.float32)

    s = _structures(spec, *coords(0.0, 0.0, 0.0))
    masks = {
        "body": np.ascontiguousarray(s["body"]),
        "lungs": s["lungs"],
        "bone": np.ascontiguousarray(s["bone"]),
        "fat": np.ascontiguousarray(s["body"] & ~s["inner"]),
    }
    for n in range(len(spec.nodules)):
        masks[f"nodule_{n}"] = np.ascontiguousarray(s[f"nodule_{n}"])

    ax, ay = spec.body_axes
    length = spec.slices * spec.slice_spacing
    lx, ly, lz = spec.lung_axes
    volumes = {
        "body": np.pi * ax * ay * length / 1000.0,
        "fat": np.pi * (ax * ay - (ax - spec.fat_rim_mm) * (ay - spec.fat_rim_mm)) * length / 1000.0,
        "lungs": 2 * (4.0 / 3.0) * np.pi * lx * ly * lz / 1000.0,
        "bone": np.pi * spec.spine_radius**2 * length / 1000.0,
    }
    for n, nod in enumerate(spec.nodules):
        volumes[f"nodule_{n}"] = nod.volume_ml
    return Phantom(
        hu=hu,
        affine=affine,
        masks=masks,
        volumes_ml={k: float(v) for k, v in volumes.items()},
        spec=spec,
        nodules=spec.nodules,
    )


@dataclass(frozen=True)
class SeriesInfo:
    """Identity of a synthetic series (deterministic UIDs from ``seed``)."""

    seed: str = "phantom"
    modality: str = "CT"
    patient_name: str = "Phantom^Chest"
    patient_id: str = "PHANTOM-001"
    patient_birth_date: str | None = "19700101"
    patient_sex: str | None = "O"
    series_description: str = "Chest phantom"
    body_part: str = "CHEST"
    series_number: int = 2
    manufacturer: str = "dicom-node phantom"
    study_uid: str | None = None
    series_uid: str | None = None
    frame_of_reference_uid: str | None = None

    def uid(self, role: str) -> str:
        explicit = {"study": self.study_uid, "series": self.series_uid, "for": self.frame_of_reference_uid}
        return explicit.get(role) or derived_uid("phantom", self.seed, role)


def _fmt(values: Iterable[float]) -> list[str]:
    # DS values: at most 16 characters.
    return [f"{v:.6g}" for v in values]


def slice_datasets(hu: np.ndarray, affine: np.ndarray, info: SeriesInfo | None = None) -> list[Dataset]:
    """Single-frame CT/MR datasets for every slice of ``hu`` (stored as int16, intercept -1024)."""
    info = info or SeriesInfo()
    slices, rows, cols = hu.shape
    row_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    row_spacing = float(np.linalg.norm(affine[:3, 1]))
    col_spacing = float(np.linalg.norm(affine[:3, 2]))
    slice_step = float(np.linalg.norm(affine[:3, 0]))
    is_ct = info.modality == "CT"
    sop_class = CTImageStorage if is_ct else MRImageStorage
    now = _dt.datetime(2026, 1, 2, 10, 30, 0)
    out = []
    for k in range(slices):
        ds = Dataset()
        sop_uid = derived_uid("phantom", info.seed, "sop", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesTime = ds.StudyTime
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = "ACC0001"
        ds.Modality = info.modality
        ds.Manufacturer = info.manufacturer
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest"
        ds.SeriesDescription = info.series_description
        ds.PatientName = info.patient_name
        ds.PatientID = info.patient_id
        if info.patient_birth_date is not None:
            ds.PatientBirthDate = info.patient_birth_date
        if info.patient_sex is not None:
            ds.PatientSex = info.patient_sex
        ds.BodyPartExamined = info.body_part
        ds.SliceThickness = f"{slice_step:.6g}"
        if is_ct:
            ds.KVP = "120"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = "10"
            ds.RepetitionTime = "500"
            ds.EchoTrainLength = "1"
            ds.MagneticFieldStrength = "1.5"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = info.uid("study")
        ds.SeriesInstanceUID = info.uid("series")
        ds.StudyID = "1"
        ds.SeriesNumber = info.series_number
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagesInAcquisition = slices
        pos = affine[:3, 3] + k * affine[:3, 0]
        ds.ImagePositionPatient = _fmt(pos)
        ds.ImageOrientationPatient = _fmt([*row_dir, *col_dir])
        ds.FrameOfReferenceUID = info.uid("for")
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{pos[2]:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = _fmt([row_spacing, col_spacing])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if is_ct:
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            stored = np.clip(np.round(hu[k] + 1024.0), -32768, 32767).astype(np.int16)
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
        else:
            stored = np.clip(np.round(hu[k]), -32768, 32767).astype(np.int16)
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def write_datasets(
    datasets: Sequence[Dataset], out_dir: Path | str, *, transfer_syntax: UID | None = None
) -> list[Path]:
    """Write datasets as Part 10 files ``<SOPInstanceUID>.dcm``; optionally compress them
    (RLE Lossless is encoded by pydicom itself; other syntaxes need their encoder plugin)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        if transfer_syntax is not None and transfer_syntax != ds.file_meta.TransferSyntaxUID:
            ds.compress(transfer_syntax)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_chest_series(
    out_dir: Path | str, spec: ChestSpec | None = None, info: SeriesInfo | None = None
) -> tuple[Phantom, list[Path]]:
    """Render a chest phantom and write it as a single-frame CT series into ``out_dir``."""
    phantom = make_chest_phantom(spec)
    paths = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), out_dir)
    return phantom, paths
