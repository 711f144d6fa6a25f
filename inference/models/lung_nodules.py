"""``ct-lung-nodules``: classical detection of lung nodules (4-30 mm) and masses (30-100 mm) in chest CT.

No trained weights; numpy, scipy.ndimage and scikit-image.  The steps, each chosen so that
findings growing from the chest wall, the mediastinum or the diaphragm survive:

1. Air (< -400 HU after a light Gaussian smoothing) on a ~2.5 mm grid; air components that reach
   the in-plane edge of the image are outside the body, the big remaining ones are the lungs.
2. The search region is, in every axial slice, the convex hull of each lung (the right and the
   left lung apart, split at the midline between them).  A lesion growing from the chest wall,
   the mediastinum or the diaphragm is a dent in the air mask; the hull bridges the dent, so the
   lesion lies inside the region instead of being cut away with the wall.
3. Candidates are the soft-tissue (> -400 HU, grown down to -550 HU) 3D components inside that
   region.  A component wider than a nodule (a mass, or a mass fused with the slice of heart,
   hilum or diaphragm dome that the hull also covers) is split at distance-transform necks, on a
   ~2.5 mm in-plane grid (every slice kept), in two stages:
   a. a watershed of the distance map of *all* soft tissue (wall included), one basin per
      regional maximum at least ``NECK_MM`` above the neck to its neighbour.  A mass on the wall
      is a blob on a bigger blob (mediastinum, chest wall, diaphragm and liver) joined at a
      neck; the basins whose deepest point lies inside the lung hull are lesions, the others
      wall, however far the hull reaches into them;
   b. what the hull pulled in of wall basins (a lens of heart, hilum or dome, and a mass fused
      with it without a neck in the whole-tissue map) is split again at the necks of that
      hull-cut tissue alone, and left to the gates below.
4. Each candidate is measured from partial-volume weighted moments in millimetres (exact for
   anisotropic voxels): weighted centroid, in-plane second moments (long axis = 2 sqrt(5 lambda)
   of a solid ellipse section, independent of the slice thickness), extent along the slice axis,
   volume, and the share of its border that faces aerated lung.
5. A confidence in [0, 1] multiplies soft gates on roundness in the plane (vessels running in
   the plane, wall slivers and hull lenses are long and thin), elongation along the slice axis
   (vessels running head to foot look round in each slice but extend over many), fill of the
   moment ellipsoid, size (4-100 mm), contrast and, for candidates wider than a nodule, lung
   contact (a mass bulges into the lung and faces it over most of its border; a lens of
   mediastinum cut off by the hull faces it on one side only) and thickness head to foot (a
   slice of diaphragm dome is flat).  Findings whose centres lie within each other's radius
   (one slice apart at most) are merged and measured again: one lesion split across slices is
   one finding.  Reported findings have a long axis of 4-100 mm (hard limits); a finding is a
   Nodule up to 30 mm (whole millimetres) and a Mass above.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.measure import block_reduce
from skimage.morphology import convex_hull_image, h_maxima
from skimage.segmentation import watershed

from inference.errors import PermanentError
from inference.prediction import (
    DIAMETER,
    ML,
    MM,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    SCT,
    VOLUME,
    Code,
    Label,
    Measurement,
    Prediction,
    Segment,
    SegmentKind,
)
from inference.volume import Volume

#: DICOM CID 6102/6104 "Nodule" and CID 7150 "Morphologically abnormal structure" (SNOMED CT).
NODULE = Code("27925004", SCT, "Nodule")
#: SNOMED CT "Mass" (4147007): a lung lesion larger than 30 mm.
MASS = Code("4147007", SCT, "Mass")
NODULE_LABEL = Label(
    name="Nodule",
    category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    type=NODULE,
    kind=SegmentKind.LESION,
    color=(255, 160, 0),
)
MASS_LABEL = Label(
    name="Mass",
    category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    type=MASS,
    kind=SegmentKind.LESION,
    color=(255, 64, 64),
)

AIR_THRESHOLD_HU = -400.0
#: Only clearly aerated lung (below this) spans the search region, so half-filled voxels at the
#: lung apex and base, where thick slices cut the lung obliquely, do not become "tissue inside".
CLEAR_LUNG_HU = -600.0
#: Candidates grow down to this density from their > -400 HU core (hysteresis), so a thin
#: vessel that partial volume breaks into dots in thick slices stays one long structure.
CANDIDATE_LOW_HU = -550.0
MIN_DIAMETER_MM = 4.0
#: Nodule up to this long-axis diameter (Fleischner Society glossary), mass above.
NODULE_MAX_MM = 30.0
MAX_DIAMETER_MM = 100.0
#: Components wider than this (mm, in-plane) are split at their distance-transform necks.
SPLIT_WIDTH_MM = 24.0
#: A basin of the split needs a distance maximum this much (mm) above the neck to its neighbour.
NECK_MM = 4.0
#: A mass must face aerated lung over at least this share of its border.
MIN_MASS_CONTACT = 0.62
#: A mass is at least this thick head to foot relative to its width (slices of a diaphragm
#: dome or a lens of wall cut by the hull are flatter).
MIN_MASS_Z_RATIO = 0.55
#: Findings below this confidence are not reported.
REPORT_THRESHOLD = 0.5
# A chest is at least this wide (mm) in-plane and this long (mm) head to foot.
_MIN_CHEST_WIDTH_MM = 100.0
_MIN_CHEST_LENGTH_MM = 20.0
_MIN_LUNG_ML = 20.0
_COARSE_MM = 2.5
#: The watershed of the necks runs on this grid (mm, in-plane).
_SPLIT_GRID_MM = 2.5
#: A lung section smaller than this (mm²) near the midline is an airway, not a lung.
_AIRWAY_MM2 = 600.0
_OUTLINE_POINTS = 32


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))


def _factors(spacing: tuple[float, float, float], grid_mm: float, *, slices: bool = True) -> tuple[int, int, int]:
    f = [max(1, round(grid_mm / s)) for s in spacing]
    return (f[0] if slices else 1, f[1], f[2])


def _block_mean(image: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors`` blocks; the last partial block repeats the edge (no zero padding)."""
    pad = [(0, (-n) % f) for n, f in zip(image.shape, factors, strict=True)]
    if any(after for _, after in pad):
        image = np.pad(image, pad, mode="edge")
    return np.asarray(block_reduce(image, factors, np.mean))  # type: ignore[no-untyped-call]


def _expand(image: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a block-reduced grid back to ``shape``."""
    out = image
    for axis, f in enumerate(factors):
        out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def convex_fill(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D grid inside the convex hull of the pixel centres of ``mask``."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    out = np.zeros(mask.shape, dtype=bool)
    if len(rows) < 2 or len(cols) < 2:
        return np.asarray(mask, dtype=bool)  # a line is its own hull (qhull needs a 2D set)
    with warnings.catch_warnings():
        # Collinear pixels: qhull warns and skimage returns an empty image; the mask is the hull.
        warnings.simplefilter("ignore", UserWarning)
        out[box] = convex_hull_image(mask[box], offset_coordinates=False)  # type: ignore[no-untyped-call]
    return np.asarray(out | mask.astype(bool))


@dataclass(frozen=True)
class _Candidate:
    label: int
    mass: float  # sum of partial-volume fractions (voxels)
    centre_index: np.ndarray  # (3,) fractional voxel index
    long_axis_mm: float
    short_axis_mm: float
    z_ratio: float
    contrast_hu: float
    contact: float
    confidence: float


class LungNoduleModel:
    """Detects lung nodules (4-30 mm) and masses (30-100 mm), wall-attached ones included, in chest CT."""

    name = "ct-lung-nodules"
    version = "1.0.0"
    modalities: frozenset[str] = frozenset({"CT"})
    labels: tuple[Label, ...] = (NODULE_LABEL, MASS_LABEL)

    def __init__(self, device: torch.device) -> None:
        # scipy and scikit-image run on the CPU; the device is accepted for the Model protocol.
        self.device = device

    # -- validation -------------------------------------------------------------------------
    def _check(self, volume: Volume) -> None:
        if volume.modality not in self.modalities:
            raise PermanentError(f"{self.name} reads CT only, got modality {volume.modality!r}")
        dz, dy, dx = volume.spacing
        slices, rows, cols = volume.shape
        width, height, length = cols * dx, rows * dy, slices * dz
        if min(width, height) < _MIN_CHEST_WIDTH_MM or length < _MIN_CHEST_LENGTH_MM or slices < 3:
            raise PermanentError(
                f"volume of {width:.0f} x {height:.0f} x {length:.0f} mm ({slices} slices) is too"
                f" small to be a chest; {self.name} needs at least {_MIN_CHEST_WIDTH_MM:.0f} mm"
                f" in-plane and {_MIN_CHEST_LENGTH_MM:.0f} mm (3 slices) head to foot"
            )

    # -- lungs ------------------------------------------------------------------------------
    def _lungs(self, smooth: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """Boolean mask of the clearly aerated lungs at full resolution."""
        factors = _factors(spacing, _COARSE_MM)
        coarse_air = _block_mean(smooth, factors) < AIR_THRESHOLD_HU
        labels, n = ndi.label(coarse_air, structure=np.ones((3, 3, 3), dtype=bool))
        if n == 0:
            raise PermanentError(f"no air found in the volume: {self.name} needs a chest CT")
        edge = np.unique(
            np.concatenate([f.ravel() for f in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1])])
        )
        coarse_ml = math.prod(f * s for f, s in zip(factors, spacing, strict=True)) / 1000.0
        sizes_ml = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64) * coarse_ml
        sizes_ml[0] = 0.0
        sizes_ml[edge] = 0.0
        largest = float(sizes_ml.max())
        if largest < _MIN_LUNG_ML:
            raise PermanentError(
                f"no lung found (largest air region inside the body is {largest:.1f} ml, need"
                f" {_MIN_LUNG_ML:.0f} ml): {self.name} needs a chest CT covering the lungs"
            )
        # Gas in bowel or stomach is small next to a lung; a trachea joined to a lung stays one.
        keep = sizes_ml >= max(_MIN_LUNG_ML, 0.1 * largest)
        # Grow by one coarse voxel so the fine air mask decides the lung boundary, not the grid.
        grown = ndi.binary_dilation(keep[labels], structure=np.ones((3, 3, 3), dtype=bool))
        fine = _expand(grown, factors, smooth.shape)
        return np.asarray(fine & (smooth < CLEAR_LUNG_HU))

    @staticmethod
    def _hull_region(lungs: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """Per slice, the convex hull of the right lung and that of the left: the search region."""
        region = np.zeros(lungs.shape, dtype=bool)
        if not lungs.any():
            return region
        cols = np.flatnonzero(lungs.any(axis=(0, 1)))
        # The two lungs lie either side of the mediastinum: split at the middle of their extent.
        midline = (int(cols[0]) + int(cols[-1])) / 2.0
        pixel_mm2 = spacing[1] * spacing[2]
        near_mm = 20.0
        columns = np.broadcast_to(np.arange(lungs.shape[2], dtype=np.float64), lungs.shape[1:]).ravel()
        for k in np.flatnonzero(lungs.any(axis=(1, 2))):
            sections, n = ndi.label(lungs[k])
            if n == 0:
                continue
            counts = np.bincount(sections.ravel(), minlength=n + 1)
            areas = counts * pixel_mm2
            centre_cols = np.bincount(sections.ravel(), weights=columns, minlength=n + 1) / np.maximum(counts, 1)
            sides = [np.zeros(lungs.shape[1:], dtype=bool), np.zeros(lungs.shape[1:], dtype=bool)]
            column = np.arange(lungs.shape[2])[None, :]
            for value in range(1, n + 1):
                c = centre_cols[value]
                if areas[value] < _AIRWAY_MM2 and abs(c - midline) * spacing[2] < near_mm:
                    continue  # trachea or a main bronchus, not a lung
                section = sections == value
                # A section crossing the midline (lungs joined by an airway) is cut there.
                sides[0] |= section & (column < midline)
                sides[1] |= section & (column >= midline)
            for side in sides:
                region[k] |= convex_fill(side)
        return region

    # -- candidates -------------------------------------------------------------------------
    def predict(self, volume: Volume) -> Prediction:
        """Find lung nodules and masses; raise ``PermanentError`` for non-CT or non-chest input."""
        self._check(volume)
        spacing = volume.spacing
        hu = np.ascontiguousarray(volume.array, dtype=np.float32)
        sigma_mm = 0.7
        sigma = (
            sigma_mm / spacing[0] if spacing[0] < 1.5 else 0.0,
            sigma_mm / spacing[1],
            sigma_mm / spacing[2],
        )
        smooth = ndi.gaussian_filter(hu, sigma, mode="nearest", truncate=3.0)
        lungs = self._lungs(smooth, spacing)
        region = self._hull_region(lungs, spacing)
        findings = self._find(volume, hu, smooth, lungs, region)
        prediction = Prediction(model_name=self.name, model_version=self.version, segments=findings)
        if not findings:
            prediction.notes.append(
                f"no nodule or mass of {MIN_DIAMETER_MM:g}-{MAX_DIAMETER_MM:g} mm found"
            )
        return prediction

    def _candidates(
        self, smooth: np.ndarray, region: np.ndarray, spacing: tuple[float, float, float]
    ) -> tuple[np.ndarray, int]:
        """Labelled candidates: tissue components of the region, wide ones split at their necks."""
        full = np.ones((3, 3, 3), dtype=bool)
        labels, n = ndi.label(region & (smooth >= CANDIDATE_LOW_HU), structure=full)
        if n == 0:
            return labels, 0
        core = np.zeros(n + 1, dtype=bool)
        core[labels[smooth >= AIR_THRESHOLD_HU]] = True
        core[0] = False
        labels = np.where(core[labels], labels, 0)
        # Components wider in-plane than a nodule are split at their distance-transform necks.
        wide = np.zeros(n + 1, dtype=bool)
        for value, box in enumerate(ndi.find_objects(labels), start=1):
            if box is not None:
                extent = max((box[1].stop - box[1].start) * spacing[1], (box[2].stop - box[2].start) * spacing[2])
                wide[value] = extent > SPLIT_WIDTH_MM
        if not wide.any():
            return labels, n
        split = wide[labels]
        # The distance map is that of all soft tissue, wall included: a mass on the wall is a
        # blob on a bigger blob (mediastinum, chest wall, diaphragm and liver), joined at a neck.
        # Every slice is kept: merging thin slices in pairs blurs the neck of a mass on the dome.
        factors = _factors(spacing, _SPLIT_GRID_MM, slices=False)
        grid = (spacing[0] * factors[0], spacing[1] * factors[1], spacing[2] * factors[2])
        tissue = _block_mean((smooth >= AIR_THRESHOLD_HU).astype(np.float32), factors) >= 0.5
        tissue |= _block_mean(split.astype(np.float32), factors) > 0.0
        inside = _block_mean(region.astype(np.float32), factors) >= 0.5
        distance = ndi.distance_transform_edt(tissue, sampling=grid)
        markers, count = ndi.label(h_maxima(distance, NECK_MM), structure=full)  # type: ignore[no-untyped-call]
        basins = watershed(-distance, markers, mask=tissue)  # type: ignore[no-untyped-call]
        # A lesion's deepest point lies in the lung's hull; a basin whose deepest point lies
        # outside it is wall (heart, liver, chest wall) even where the hull reaches into it.
        lesion = np.zeros(count + 1, dtype=bool)
        lesion[markers[inside & (markers > 0)]] = True
        lesion[0] = False
        basins = np.where(lesion[basins], basins, 0)
        fine = _expand(basins, factors, labels.shape)
        labels = np.where(split, np.where(fine > 0, fine + n, 0), labels)
        # What the hull pulled in of wall basins (slices of heart, hilum or diaphragm, and a mass
        # fused with them without a neck of its own) is split at the necks of the hull-cut
        # tissue alone; the lung-contact and flatness gates then tell a mass from a slice of wall.
        rest = split & (fine == 0)
        if rest.any():
            coarse = _block_mean(rest.astype(np.float32), factors) > 0.0
            distance = ndi.distance_transform_edt(coarse, sampling=grid)
            markers, _ = ndi.label(h_maxima(distance, NECK_MM), structure=full)  # type: ignore[no-untyped-call]
            pieces = _expand(watershed(-distance, markers, mask=coarse), factors, labels.shape)  # type: ignore[no-untyped-call]
            labels = np.where(rest, np.where(pieces > 0, pieces + n + count, 0), labels)
        return labels, int(labels.max())

    def _find(
        self,
        volume: Volume,
        hu: np.ndarray,
        smooth: np.ndarray,
        lungs: np.ndarray,
        region: np.ndarray,
    ) -> list[Segment]:
        if not region.any():
            return []
        # Work inside the bounding box of the region: everything else is outside the lungs.
        box = ndi.find_objects(region.astype(np.uint8))[0]
        labels, n = self._candidates(smooth[box], region[box], volume.spacing)
        if n == 0:
            return []
        air = hu[box][lungs[box]]
        background = float(np.median(air)) if air.size else -850.0
        crop = _Crop(volume, hu[box], smooth[box], region[box], np.array([s.start for s in box], float), background)
        kept = [c for c in crop.measure(labels, n) if c.confidence >= REPORT_THRESHOLD]
        # One lesion split into pieces on adjacent slices (or by a neck) is one finding: pieces
        # whose centres lie within each other's radius in-plane and one slice apart are merged
        # and measured again.
        merged = _merge_groups(kept, volume)
        if any(len(group) > 1 for group in merged):
            relabel = np.arange(n + 1)
            for group in merged:
                relabel[[c.label for c in group]] = group[0].label
            labels = relabel[labels]
            again = {c.label: c for c in crop.measure(labels, n)}
            kept = [c for c in (again.get(g[0].label) for g in merged) if c and c.confidence >= REPORT_THRESHOLD]
        kept.sort(key=lambda c: -c.confidence)
        return self._segments(volume, labels, box, kept, volume.voxel_volume_ml)

    def _segments(
        self,
        volume: Volume,
        labels: np.ndarray,
        box: tuple[slice, ...],
        kept: list[_Candidate],
        voxel_ml: float,
    ) -> list[Segment]:
        numbers = {NODULE_LABEL.name: 0, MASS_LABEL.name: 0}
        out = []
        for cand in kept:
            # A nodule is at most 30 mm across (in whole millimetres, as it is reported).
            label = MASS_LABEL if round(cand.long_axis_mm) > NODULE_MAX_MM else NODULE_LABEL
            numbers[label.name] += 1
            out.append(self._segment(volume, labels, box, cand, label, f"{label.name} {numbers[label.name]}", voxel_ml))
        return out

    def _segment(
        self,
        volume: Volume,
        labels: np.ndarray,
        box: tuple[slice, ...],
        cand: _Candidate,
        label: Label,
        tracking_id: str,
        voxel_ml: float,
    ) -> Segment:
        mask = np.zeros(volume.shape, dtype=bool)
        mask[box] = labels == cand.label
        per_slice = mask.sum(axis=(1, 2))
        # Largest cross-section; on a tie the slice nearest the centre.
        best = np.flatnonzero(per_slice == per_slice.max())
        key_slice = int(best[np.argmin(np.abs(best - cand.centre_index[0]))])
        outline = _outline(volume, mask[key_slice], key_slice)
        centre = volume.index_to_patient(cand.centre_index)
        return Segment(
            label=label,
            mask=mask,
            measurements=[
                Measurement(DIAMETER, round(cand.long_axis_mm, 2), MM),
                Measurement(VOLUME, round(cand.mass * voxel_ml, 4), ML),
            ],
            tracking_id=tracking_id,
            confidence=round(float(cand.confidence), 4),
            centre=(float(centre[0]), float(centre[1]), float(centre[2])),
            key_slice=key_slice,
            outline=outline,
        )



@dataclass(frozen=True)
class _Crop:
    """The region's bounding box of a volume, where candidates are measured."""

    volume: Volume
    hu: np.ndarray
    smooth: np.ndarray
    region: np.ndarray
    offset: np.ndarray  # (3,) index of the crop's first voxel in the volume
    background: float  # median density of the aerated lung (HU)

    def measure(self, labels: np.ndarray, n: int) -> list[_Candidate]:
        """Every candidate of at least the minimum size, with its measurements and confidence."""
        volume, background, offset = self.volume, self.background, self.offset
        hu_b, smooth_b, region_b = self.hu, self.smooth, self.region
        # Partial-volume shell: the air voxels of the region next to a candidate belong to it.
        grown = ndi.maximum_filter(labels, size=3)
        owner = np.where(labels > 0, labels, np.where(region_b, grown, 0))
        idx = np.argwhere(owner > 0)
        own = owner[idx[:, 0], idx[:, 1], idx[:, 2]]
        # Foreground density per candidate: brightest smoothed voxel, at least water (small
        # nodules never fill a voxel, so their peak understates the tissue density).
        inside = labels > 0
        peak = np.full(n + 1, -2000.0)
        np.maximum.at(peak, labels[inside], smooth_b[inside])
        fg = np.clip(peak, 0.0, 200.0)
        values = hu_b[idx[:, 0], idx[:, 1], idx[:, 2]]
        w = np.clip((values - background) / (fg[own] - background), 0.0, 1.0).astype(np.float64)

        a = volume.affine[:3, :3]
        pos = idx.astype(np.float64) + offset
        mm = pos @ a.T
        mass = np.bincount(own, weights=w, minlength=n + 1)
        first = np.stack([np.bincount(own, weights=w * pos[:, i], minlength=n + 1) for i in range(3)], 1)
        second = np.stack(
            [np.bincount(own, weights=w * mm[:, i] * mm[:, j], minlength=n + 1) for i in range(3) for j in range(3)],
            1,
        )
        count = np.bincount(labels.ravel(), minlength=n + 1)
        contact = _lung_contact(labels, region_b & ~inside, n)

        # Sheppard's correction: a voxel spreads its mass over its box, adding the box variance.
        box_cov = a @ a.T / 12.0
        row_dir = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
        col_dir = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
        in_plane = np.stack([row_dir, col_dir])
        normal = np.cross(row_dir, col_dir)
        slice_step = abs(float(volume.affine[:3, 0] @ normal))
        voxel_ml = volume.voxel_volume_ml
        min_mass = (math.pi / 6.0 * (0.8 * MIN_DIAMETER_MM) ** 3 / 1000.0) / voxel_ml

        out: list[_Candidate] = []
        for lab in range(1, n + 1):
            m = float(mass[lab])
            if m < min_mass or count[lab] == 0:
                continue
            centre_index = first[lab] / m
            centre_mm = a @ centre_index
            cov = second[lab].reshape(3, 3) / m - np.outer(centre_mm, centre_mm) - box_cov
            plane_cov = in_plane @ cov @ in_plane.T
            eig = np.clip(np.linalg.eigvalsh(plane_cov), 1e-6, None)
            long_axis = 2.0 * math.sqrt(5.0 * float(eig[1]))
            short_axis = 2.0 * math.sqrt(5.0 * float(eig[0]))
            var_normal = max(float(normal @ cov @ normal), 0.0)
            z_ratio = math.sqrt(var_normal / float(eig[1]))
            contrast = float(peak[lab]) - background
            # Fill of the moment ellipsoid: ~1 for a solid ellipsoid or a cap on the wall, low for
            # vessels crossing in a star.  Only trusted once the object spans a few slices.
            semi_normal = math.sqrt(5.0 * var_normal)
            if semi_normal >= slice_step:
                ellipsoid_ml = 4.0 / 3.0 * math.pi * (long_axis / 2) * (short_axis / 2) * semi_normal / 1000
                fill = m * voxel_ml / ellipsoid_ml
            else:
                fill = 1.0
            roundness = short_axis / long_axis
            # How much of a mass (rather than a nodule) the candidate is: masses are cut from the
            # wall at a neck and are seldom ellipsoids, so they need less fill and may be longer
            # head to foot, but they must bulge into the lung.
            wide = _sigmoid((long_axis - NODULE_MAX_MM) / 2.0)
            confidence = (
                _sigmoid((roundness - 0.42) / 0.05)
                * _sigmoid((1.8 + 0.4 * wide - z_ratio) / 0.12)
                * _sigmoid((long_axis - (MIN_DIAMETER_MM - 0.5)) / 0.25)
                * _sigmoid((MAX_DIAMETER_MM - long_axis) / 2.5)
                * _sigmoid((contrast - 500.0) / 50.0)
                * _sigmoid((fill - (0.55 - 0.15 * wide)) / 0.07)
                * (1.0 - wide + wide * _sigmoid((float(contact[lab]) - MIN_MASS_CONTACT) / 0.03))
                * (1.0 - wide + wide * _sigmoid((z_ratio - MIN_MASS_Z_RATIO) / 0.05))
            )
            if not MIN_DIAMETER_MM <= long_axis <= MAX_DIAMETER_MM:
                continue  # the documented range is a hard limit, not only a soft gate
            out.append(
                _Candidate(
                    lab, m, centre_index, long_axis, short_axis, z_ratio, contrast,
                    float(contact[lab]), confidence,
                )
            )
        return out


def _merge_groups(cands: list[_Candidate], volume: Volume) -> list[list[_Candidate]]:
    """Groups of candidates that are pieces of one lesion (highest confidence first in each)."""
    order = sorted(cands, key=lambda c: -c.confidence)
    centres = [volume.index_to_patient(c.centre_index) for c in order]
    normal = np.cross(volume.affine[:3, 1], volume.affine[:3, 2])
    normal /= np.linalg.norm(normal)
    step = abs(float(volume.affine[:3, 0] @ normal))
    parent = list(range(len(order)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(order)):
        for j in range(i + 1, len(order)):
            d = centres[j] - centres[i]
            signed = float(d @ normal)
            along, across = abs(signed), float(np.linalg.norm(d - signed * normal))
            reach = max(order[i].long_axis_mm, order[j].long_axis_mm) / 2.0
            if across <= reach and along <= reach + step:
                parent[root(j)] = root(i)
    groups: dict[int, list[_Candidate]] = {}
    for i, cand in enumerate(order):
        groups.setdefault(root(i), []).append(cand)
    return list(groups.values())

def _lung_contact(labels: np.ndarray, air: np.ndarray, n: int) -> np.ndarray:
    """Per label, the share of its border voxels that touch aerated lung (6-neighbourhood)."""
    cross = ndi.generate_binary_structure(3, 1)
    lowest = ndi.minimum_filter(labels, footprint=cross)
    highest = ndi.maximum_filter(labels, footprint=cross)
    border = (labels > 0) & ((lowest != labels) | (highest != labels))
    touching = border & ndi.binary_dilation(air, structure=cross)
    total = np.bincount(labels[border], minlength=n + 1).astype(np.float64)
    return np.bincount(labels[touching], minlength=n + 1) / np.maximum(total, 1.0)
def _outline(volume: Volume, section: np.ndarray, key_slice: int) -> np.ndarray:
    """Closed polyline (first point repeated last) in LPS mm tracing ``section``'s boundary."""
    rr, cc = np.nonzero(section)
    r0, c0 = float(rr.mean()), float(cc.mean())
    image = section.astype(np.float64)
    angles = np.linspace(0.0, 2.0 * np.pi, _OUTLINE_POINTS, endpoint=False)
    reach = float(np.hypot(rr.max() - rr.min(), cc.max() - cc.min())) + 2.0
    steps = np.arange(0.0, reach, 0.1)
    points = []
    for theta in angles:
        r = r0 + steps * math.sin(theta)
        c = c0 + steps * math.cos(theta)
        value = _bilinear(image, r, c)
        inside = np.flatnonzero(value >= 0.5)
        radius = float(steps[inside[-1]]) if inside.size else 0.5
        radius = max(radius, 0.5)
        points.append((key_slice, r0 + radius * math.sin(theta), c0 + radius * math.cos(theta)))
    points.append(points[0])
    return volume.index_to_patient(np.array(points, dtype=np.float64))


def _bilinear(image: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` at fractional ``(r, c)``; zero outside."""
    padded = np.pad(image, 1)
    r = np.clip(r + 1.0, 0.0, padded.shape[0] - 1.001)
    c = np.clip(c + 1.0, 0.0, padded.shape[1] - 1.001)
    r_i, c_i = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = r - r_i, c - c_i
    return np.asarray(
        padded[r_i, c_i] * (1 - fr) * (1 - fc)
        + padded[r_i + 1, c_i] * fr * (1 - fc)
        + padded[r_i, c_i + 1] * (1 - fr) * fc
        + padded[r_i + 1, c_i + 1] * fr * fc
    )
