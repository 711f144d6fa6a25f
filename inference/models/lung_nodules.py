"""``ct-lung-nodules``: classical lung nodule and mass detection (4-60 mm) in chest CT, in torch.

No trained weights.  The steps, each chosen so that juxtapleural nodules survive:

1. Air (< -400 HU after a light smoothing) on a ~2.5 mm grid; air components that reach the
   in-plane edge of the image are outside the body, the big remaining ones are the lungs.
2. The lung region of interest is the convex hull of each lung in every axial slice.  A nodule
   growing from the chest wall or the mediastinum is a dent in the air mask; the hull bridges the
   dent, so the nodule lies inside the region instead of being cut away with the wall.
3. Candidates are the soft-tissue (> -400 HU) components inside that region.  Each one is
   measured from partial-volume weighted moments in millimetres (exact for anisotropic voxels):
   weighted centroid, in-plane second moments (long axis = 2 sqrt(5 lambda) of a solid ellipse
   section, independent of the slice thickness), extent along the slice axis and volume.
4. A confidence in [0, 1] multiplies soft gates on roundness in the plane (vessels running in the
   plane and wall slivers are long and thin), elongation along the slice axis (vessels running
   head to foot look round in each slice but extend over many), size (4-60 mm) and contrast.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inference import ops
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
NODULE_LABEL = Label(
    name="Nodule",
    category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    type=NODULE,
    kind=SegmentKind.LESION,
    color=(255, 160, 0),
)

AIR_THRESHOLD_HU = -400.0
#: Only clearly aerated lung (below this) spans the search region, so half-filled voxels at the
#: lung apex and base, where thick slices cut the lung obliquely, do not become "tissue inside".
CLEAR_LUNG_HU = -600.0
#: Candidates grow down to this density from their > -400 HU core (hysteresis), so a thin
#: vessel that partial volume breaks into dots in thick slices stays one long structure.
CANDIDATE_LOW_HU = -550.0
MIN_DIAMETER_MM = 4.0
MAX_DIAMETER_MM = 60.0
#: Findings below this confidence are not reported.
REPORT_THRESHOLD = 0.5
# A chest is at least this wide (mm) in-plane and this long (mm) head to foot.
_MIN_CHEST_WIDTH_MM = 100.0
_MIN_CHEST_LENGTH_MM = 20.0
_MIN_LUNG_ML = 20.0
_COARSE_MM = 2.5
_OUTLINE_POINTS = 32


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))


def _gaussian_smooth(image: torch.Tensor, sigma_vox: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of a 3D tensor (axes with sigma < 0.3 voxel are left alone)."""
    out = image
    for axis, sigma in enumerate(sigma_vox):
        if sigma < 0.3:
            continue
        radius = max(1, math.ceil(3.0 * sigma))
        taps = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
        total = sum(taps)
        # A few shifted adds beat conv3d with a 1D kernel on CPU by an order of magnitude.
        ends = [out.narrow(axis, 0, 1), out.narrow(axis, out.shape[axis] - 1, 1)]
        padded = torch.cat([ends[0]] * radius + [out] + [ends[1]] * radius, dim=axis)
        acc = torch.zeros_like(out)
        for i, tap in enumerate(taps):
            acc += padded.narrow(axis, i, out.shape[axis]) * (tap / total)
        out = acc
    return out


def _coarse_factors(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    f = tuple(max(1, round(_COARSE_MM / s)) for s in spacing)
    return (f[0], f[1], f[2])


def _downsample_mean(image: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    pad = [0, 0, 0, 0, 0, 0]
    for axis, f in enumerate(factors):
        pad[2 * (2 - axis) + 1] = (-image.shape[axis]) % f
    x = F.pad(image[None, None], pad, mode="replicate")
    return F.avg_pool3d(x, kernel_size=factors, stride=factors)[0, 0]


def _upsample_nearest(
    image: torch.Tensor, factors: tuple[int, int, int], shape: tuple[int, ...]
) -> torch.Tensor:
    out = image
    for axis, f in enumerate(factors):
        out = out.repeat_interleave(f, dim=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def _monotone_chain(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Convex hull vertices (counter-clockwise) of 2D points sorted lexicographically."""
    if len(points) <= 2:
        return points

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        for p in seq:
            while len(chain) >= 2:
                (oy, ox), (ay, ax) = chain[-2], chain[-1]
                if (ay - oy) * (p[1] - ox) - (ax - ox) * (p[0] - oy) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    return half(points)[:-1] + half(points[::-1])[:-1]


def convex_fill(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D grid inside the convex hull of the pixel centres of ``mask``."""
    rows = np.flatnonzero(mask.any(axis=1))
    out = np.zeros_like(mask, dtype=bool)
    if rows.size == 0:
        return out
    sub = mask[rows]
    left = sub.argmax(axis=1)
    right = mask.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    # The row extremes span the same hull as all pixels, at a fraction of the points; row by
    # row, (left, right) is already lexicographic order.
    points = np.stack([np.repeat(rows, 2), np.stack([left, right], 1).reshape(-1)], 1)
    hull = np.array(_monotone_chain([(int(r), int(c)) for r, c in points]), dtype=np.float64)
    if hull.ndim != 2 or len(hull) == 0:
        return np.asarray(mask, dtype=bool)
    r0, r1 = int(rows[0]), int(rows[-1])
    lo = np.full(r1 - r0 + 1, np.inf)
    hi = np.full(r1 - r0 + 1, -np.inf)
    vertices = np.concatenate([hull, hull[:1]]).astype(np.float64)
    for (ya, xa), (yb, xb) in itertools.pairwise(vertices):
        y_lo, y_hi = int(min(ya, yb)), int(max(ya, yb))
        ys = np.arange(y_lo, y_hi + 1, dtype=np.float64)
        xs = np.array([xa, xb]) if ya == yb else xa + (ys - ya) * (xb - xa) / (yb - ya)
        if ya == yb:
            ys = np.array([ya, ya])
        idx = ys.astype(np.int64) - r0
        np.minimum.at(lo, idx, xs)
        np.maximum.at(hi, idx, xs)
    cols = np.arange(mask.shape[1])
    inside = (cols[None, :] >= np.ceil(lo - 1e-6)[:, None]) & (
        cols[None, :] <= np.floor(hi + 1e-6)[:, None]
    )
    out[r0 : r1 + 1] = inside
    return np.asarray(out | mask, dtype=bool)


@dataclass(frozen=True)
class _Candidate:
    label: int
    mass: float  # sum of partial-volume fractions (voxels)
    centre_index: np.ndarray  # (3,) fractional voxel index
    long_axis_mm: float
    short_axis_mm: float
    z_ratio: float
    contrast_hu: float
    confidence: float


class LungNoduleModel:
    """Detects lung nodules and masses of 4-60 mm, juxtapleural ones included, in chest CT."""

    name = "ct-lung-nodules"
    version = "1.0.0"
    modalities: frozenset[str] = frozenset({"CT"})
    labels: tuple[Label, ...] = (NODULE_LABEL,)

    def __init__(self, device: torch.device) -> None:
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
    def _lungs(self, smooth: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
        """Integer lung labels (0 = not lung) at full resolution."""
        factors = _coarse_factors(spacing)
        coarse_air = _downsample_mean(smooth, factors) < AIR_THRESHOLD_HU
        labels, n = ops.connected_components(coarse_air, 26)
        if n == 0:
            raise PermanentError(f"no air found in the volume: {self.name} needs a chest CT")
        edge = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
        for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            edge[face.reshape(-1)] = True
        coarse_ml = math.prod(f * s for f, s in zip(factors, spacing, strict=True)) / 1000.0
        sizes_ml = ops.component_sizes(labels, n).to(torch.float64) * coarse_ml
        sizes_ml[edge[1:]] = 0.0
        largest = float(sizes_ml.max())
        if largest < _MIN_LUNG_ML:
            raise PermanentError(
                f"no lung found (largest air region inside the body is {largest:.1f} ml, need"
                f" {_MIN_LUNG_ML:.0f} ml): {self.name} needs a chest CT covering the lungs"
            )
        # Gas in bowel or stomach is small next to a lung; a trachea joined to a lung stays one.
        keep = torch.zeros(n + 1, dtype=torch.bool, device=labels.device)
        keep[1:] = sizes_ml >= max(_MIN_LUNG_ML, 0.1 * largest)
        lung_labels = torch.where(keep[labels], labels, torch.zeros_like(labels))
        # Grow by one coarse voxel so the fine air mask decides the lung boundary, not the grid.
        grown = F.max_pool3d(lung_labels[None, None].to(torch.float32), 3, 1, 1)[0, 0]
        fine = _upsample_nearest(grown, factors, tuple(smooth.shape)).to(torch.int64)
        return torch.where(smooth < CLEAR_LUNG_HU, fine, torch.zeros_like(fine))

    @staticmethod
    def _hull_region(lung_labels: torch.Tensor) -> torch.Tensor:
        """Per slice and per lung, the convex hull of the lung: the region searched for nodules."""
        labels = lung_labels.cpu().numpy()
        region = np.zeros(labels.shape, dtype=bool)
        for value in np.unique(labels):
            if value == 0:
                continue
            lung = labels == value
            for k in np.flatnonzero(lung.any(axis=(1, 2))):
                region[k] |= convex_fill(lung[k])
        return torch.from_numpy(region).to(lung_labels.device)

    # -- candidates -------------------------------------------------------------------------
    def predict(self, volume: Volume) -> Prediction:
        """Find lung nodules; raise ``PermanentError`` for non-CT or non-chest input."""
        self._check(volume)
        spacing = volume.spacing
        with torch.no_grad():
            hu = torch.as_tensor(
                np.ascontiguousarray(volume.array), dtype=torch.float32, device=self.device
            )
            sigma_mm = 0.7
            sigma = (
                sigma_mm / spacing[0] if spacing[0] < 1.5 else 0.0,
                sigma_mm / spacing[1],
                sigma_mm / spacing[2],
            )
            smooth = _gaussian_smooth(hu, sigma)
            lungs = self._lungs(smooth, spacing)
            region = self._hull_region(lungs)
            findings = self._find(volume, hu, smooth, lungs > 0, region)
        prediction = Prediction(model_name=self.name, model_version=self.version, segments=findings)
        if not findings:
            prediction.notes.append(
                f"no nodule of {MIN_DIAMETER_MM:.0f}-{MAX_DIAMETER_MM:.0f} mm found"
            )
        return prediction

    def _find(
        self,
        volume: Volume,
        hu: torch.Tensor,
        smooth: torch.Tensor,
        lungs: torch.Tensor,
        region: torch.Tensor,
    ) -> list[Segment]:
        if not bool(region.any()):
            return []
        # Work inside the bounding box of the region: everything else is outside the lungs.
        nz = region.nonzero()
        lo = nz.min(0).values
        hi = nz.max(0).values + 1
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        offset = lo.cpu().numpy().astype(np.float64)
        hu_b, smooth_b, region_b, lungs_b = hu[box], smooth[box], region[box], lungs[box]

        labels, n = ops.connected_components(region_b & (smooth_b >= CANDIDATE_LOW_HU), 26)
        if n == 0:
            return []
        core = torch.zeros(n + 1, dtype=torch.bool, device=hu.device)
        core[labels[smooth_b >= AIR_THRESHOLD_HU]] = True
        core[0] = False
        labels = torch.where(core[labels], labels, torch.zeros_like(labels))
        air = hu_b[lungs_b]
        background = float(air.median()) if air.numel() else -850.0

        # Partial-volume shell: the air voxels of the region next to a candidate belong to it.
        grown = F.max_pool3d(labels[None, None].to(torch.float32), 3, 1, 1)[0, 0].to(torch.int64)
        owner = torch.where(
            labels > 0, labels, torch.where(region_b, grown, torch.zeros_like(labels))
        )
        idx = owner.nonzero()
        own = owner[idx[:, 0], idx[:, 1], idx[:, 2]]
        # Foreground density per candidate: brightest smoothed voxel, at least water (small
        # nodules never fill a voxel, so their peak understates the tissue density).
        peak = torch.full((n + 1,), -2000.0, device=hu.device)
        inside = labels > 0
        peak.scatter_reduce_(0, labels[inside], smooth_b[inside], reduce="amax")
        fg = peak.clamp(min=0.0, max=200.0)
        values = hu_b[idx[:, 0], idx[:, 1], idx[:, 2]]
        w = ((values - background) / (fg[own] - background)).clamp(0.0, 1.0).to(torch.float64)

        a = torch.as_tensor(volume.affine[:3, :3], dtype=torch.float64, device=hu.device)
        pos = idx.to(torch.float64) + torch.as_tensor(offset, device=hu.device)
        mm = pos @ a.T
        mass = torch.zeros(n + 1, dtype=torch.float64, device=hu.device).index_add_(0, own, w)
        first = torch.zeros((n + 1, 3), dtype=torch.float64, device=hu.device).index_add_(
            0, own, w[:, None] * pos
        )
        outer = (mm[:, :, None] * mm[:, None, :]).reshape(-1, 9)
        second = torch.zeros((n + 1, 9), dtype=torch.float64, device=hu.device).index_add_(
            0, own, w[:, None] * outer
        )
        count = torch.bincount(labels.reshape(-1), minlength=n + 1)

        # Sheppard's correction: a voxel spreads its mass over its box, adding the box variance.
        box_cov = (a @ a.T / 12.0).cpu().numpy()
        row_dir = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
        col_dir = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
        in_plane = np.stack([row_dir, col_dir])
        normal = np.cross(row_dir, col_dir)
        slice_step = abs(float(volume.affine[:3, 0] @ normal))
        voxel_ml = volume.voxel_volume_ml
        min_mass = (math.pi / 6.0 * (0.8 * MIN_DIAMETER_MM) ** 3 / 1000.0) / voxel_ml

        mass_np, first_np, second_np = mass.cpu().numpy(), first.cpu().numpy(), second.cpu().numpy()
        count_np = count.cpu().numpy()
        peak_np = peak.cpu().numpy()
        kept: list[_Candidate] = []
        for lab in range(1, n + 1):
            m = float(mass_np[lab])
            if m < min_mass or count_np[lab] == 0:
                continue
            centre_index = first_np[lab] / m
            centre_mm = volume.affine[:3, :3] @ centre_index
            cov = second_np[lab].reshape(3, 3) / m - np.outer(centre_mm, centre_mm) - box_cov
            plane_cov = in_plane @ cov @ in_plane.T
            eig = np.clip(np.linalg.eigvalsh(plane_cov), 1e-6, None)
            long_axis = 2.0 * math.sqrt(5.0 * float(eig[1]))
            short_axis = 2.0 * math.sqrt(5.0 * float(eig[0]))
            var_normal = max(float(normal @ cov @ normal), 0.0)
            z_ratio = math.sqrt(var_normal / float(eig[1]))
            contrast = float(peak_np[lab]) - background
            # Fill of the moment ellipsoid: ~1 for a solid ellipsoid or a cap on the wall, low for
            # vessels crossing in a star.  Only trusted once the object spans a few slices.
            semi_normal = math.sqrt(5.0 * var_normal)
            if semi_normal >= slice_step:
                ellipsoid_ml = (
                    4.0 / 3.0 * math.pi * (long_axis / 2) * (short_axis / 2) * semi_normal / 1000
                )
                fill = m * voxel_ml / ellipsoid_ml
            else:
                fill = 1.0
            roundness = short_axis / long_axis
            confidence = (
                _sigmoid((roundness - 0.42) / 0.05)
                * _sigmoid((1.8 - z_ratio) / 0.12)
                * _sigmoid((long_axis - (MIN_DIAMETER_MM - 0.5)) / 0.25)
                * _sigmoid((MAX_DIAMETER_MM - long_axis) / 1.5)
                * _sigmoid((contrast - 500.0) / 50.0)
                * _sigmoid((fill - 0.55) / 0.07)
            )
            if (
                confidence < REPORT_THRESHOLD
                or long_axis < 0.9 * MIN_DIAMETER_MM
                or long_axis > 1.1 * MAX_DIAMETER_MM
            ):
                continue
            kept.append(
                _Candidate(
                    lab, m, centre_index, long_axis, short_axis, z_ratio, contrast, confidence
                )
            )
        kept.sort(key=lambda c: -c.confidence)
        return [self._segment(volume, labels, box, c, i + 1, voxel_ml) for i, c in enumerate(kept)]

    def _segment(
        self,
        volume: Volume,
        labels: torch.Tensor,
        box: tuple[slice, ...],
        cand: _Candidate,
        number: int,
        voxel_ml: float,
    ) -> Segment:
        component = (labels == cand.label).cpu().numpy()
        mask = np.zeros(volume.shape, dtype=bool)
        mask[box] = component
        per_slice = mask.sum(axis=(1, 2))
        # Largest cross-section; on a tie the slice nearest the centre.
        best = np.flatnonzero(per_slice == per_slice.max())
        key_slice = int(best[np.argmin(np.abs(best - cand.centre_index[0]))])
        outline = _outline(volume, mask[key_slice], key_slice)
        centre = volume.index_to_patient(cand.centre_index)
        return Segment(
            label=NODULE_LABEL,
            mask=mask,
            measurements=[
                Measurement(DIAMETER, round(cand.long_axis_mm, 2), MM),
                Measurement(VOLUME, round(cand.mass * voxel_ml, 4), ML),
            ],
            tracking_id=f"Nodule {number}",
            confidence=round(float(cand.confidence), 4),
            centre=(float(centre[0]), float(centre[1]), float(centre[2])),
            key_slice=key_slice,
            outline=outline,
        )


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
