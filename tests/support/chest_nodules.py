"""Chest phantoms for the nodule detector: spheres in the lung or on its wall, plus vessels.

Built on :func:`dicom_node.demo.make_chest_phantom`; adds vessel-like tubes (capsules
of soft-tissue density inside the lungs) so that a detector has elongated look-alikes to reject,
and places nodules from a seed so tests and benchmarks see the same cases every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from dicom_node.demo import (
    NODULE_HU,
    SOFT_TISSUE_HU,
    ChestSpec,
    Phantom,
    Sphere,
    make_chest_phantom,
)
from inference.prediction import Prediction, Segment

#: Where a nodule sits: inside the lung, or touching the lateral / anterior / posterior chest
#: wall or the mediastinum (medial lung surface).
Placement = Literal["free", "lateral", "anterior", "posterior", "mediastinal"]


@dataclass(frozen=True)
class Tube:
    """A vessel-like capsule between two LPS mm points."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    diameter_mm: float
    hu: float = SOFT_TISSUE_HU


@dataclass
class NodulePhantom:
    """A chest phantom with nodules (``phantom.nodules``), their placement, and vessels."""

    phantom: Phantom
    placements: tuple[Placement, ...]
    tubes: tuple[Tube, ...] = field(default_factory=tuple)


def chest_spec(
    *,
    rows: int = 128,
    columns: int = 160,
    slices: int = 56,
    pixel_spacing: float = 1.4,
    slice_spacing: float = 2.5,
    scale: float = 0.7,
    noise_hu: float = 15.0,
    seed: int = 0,
) -> ChestSpec:
    """A chest spec with anatomy ``scale`` times the default phantom's, on the given grid."""
    return ChestSpec(
        rows=rows,
        columns=columns,
        slices=slices,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        body_axes=(150.0 * scale, 110.0 * scale),
        fat_rim_mm=12.0 * scale,
        lung_axes=(45.0 * scale, 60.0 * scale, 90.0 * scale),
        lung_offset_x=70.0 * scale,
        spine_radius=15.0 * scale,
        spine_y=75.0 * scale,
        noise_hu=noise_hu,
        seed=seed,
    )


def _lung_value(spec: ChestSpec, p: np.ndarray, side: float, margin: float = 0.0) -> float:
    """Ellipsoid radius of ``p`` in the ``side`` lung shrunk by ``margin`` (< 1 inside)."""
    lx, ly, lz = (a - margin for a in spec.lung_axes)
    x, y, z = p[0] - side * spec.lung_offset_x, p[1], p[2]
    return float((x / lx) ** 2 + (y / ly) ** 2 + (z / lz) ** 2)


def _z_range(spec: ChestSpec, margin: float) -> tuple[float, float]:
    half = (spec.slices - 1) / 2.0 * spec.slice_spacing
    return (-half + margin, half - margin)


def _wall_point(
    spec: ChestSpec, rng: np.random.Generator, side: float, placement: Placement, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """A point on the lung surface at height ``z`` facing ``placement``, and the inward normal."""
    lx, ly, lz = spec.lung_axes
    # Angle in the axial plane measured in the lung's own frame; x grows towards the patient's left.
    outward = {
        "lateral": 0.0,
        "anterior": -np.pi / 2,
        "posterior": np.pi / 2,
        "mediastinal": np.pi,
    }[placement]
    # "lateral" faces away from the midline: +x for the left lung (side=+1), -x for the right.
    theta = outward + rng.uniform(-0.35, 0.35)
    scale = np.sqrt(max(1.0 - (z / lz) ** 2, 0.0))
    ax, ay = lx * scale, ly * scale
    px = side * ax * np.cos(theta)
    py = ay * np.sin(theta)
    point = np.array([side * spec.lung_offset_x + px, py, z])
    gradient = np.array([px / lx**2, py / ly**2, z / lz**2])
    return point, -gradient / np.linalg.norm(gradient)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def place_nodules(
    spec: ChestSpec,
    diameters: Sequence[float],
    placements: Sequence[Placement],
    seed: int,
    *,
    embed_fraction: float = 0.2,
) -> tuple[Sphere, ...]:
    """Seeded, non-overlapping spheres; wall nodules are embedded ``embed_fraction`` of a radius."""
    rng = np.random.default_rng(seed)
    placed: list[Sphere] = []
    for diameter, placement in zip(diameters, placements, strict=True):
        r = diameter / 2.0
        for _ in range(2000):
            side = float(rng.choice([-1.0, 1.0]))
            z_lo, z_hi = _z_range(spec, r + 2.0)
            lz = spec.lung_axes[2]
            # Keep away from the lung apex and base, where the lung is too small for the sphere.
            z = rng.uniform(max(z_lo, -0.55 * lz), min(z_hi, 0.55 * lz))
            if placement == "free":
                lx, ly, _ = spec.lung_axes
                centre = np.array(
                    [side * spec.lung_offset_x + rng.uniform(-lx, lx), rng.uniform(-ly, ly), z]
                )
                if _lung_value(spec, centre, side, margin=r + 3.0) > 1.0:
                    continue
            else:
                point, normal = _wall_point(spec, rng, side, placement, z)
                centre = point + normal * r * (1.0 - embed_fraction)
            if any(
                np.linalg.norm(centre - np.array(o.centre)) < r + o.diameter_mm / 2.0 + 6.0
                for o in placed
            ):
                continue
            placed.append(
                Sphere(
                    centre=(float(centre[0]), float(centre[1]), float(centre[2])),
                    diameter_mm=float(diameter),
                    hu=NODULE_HU,
                )
            )
            break
        else:
            raise ValueError(f"could not place a {diameter} mm {placement} nodule in the phantom")
    return tuple(placed)


def place_tubes(
    spec: ChestSpec, nodules: Sequence[Sphere], count: int, seed: int
) -> tuple[Tube, ...]:
    """Seeded vessel-like tubes (2-5 mm wide, 25-60 mm long) in the lungs, clear of every nodule."""
    rng = np.random.default_rng(seed + 7919)
    tubes: list[Tube] = []
    lx, ly, _ = spec.lung_axes
    for _ in range(count):
        for _ in range(2000):
            side = float(rng.choice([-1.0, 1.0]))
            z_lo, z_hi = _z_range(spec, 4.0)
            a = np.array(
                [
                    side * spec.lung_offset_x + rng.uniform(-lx, lx),
                    rng.uniform(-ly, ly),
                    rng.uniform(z_lo, z_hi),
                ]
            )
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            length = rng.uniform(25.0, 60.0)
            b = a + direction * length
            diameter = rng.uniform(2.0, 5.0)
            if not (z_lo <= b[2] <= z_hi):
                continue
            if max(_lung_value(spec, a, side, 4.0), _lung_value(spec, b, side, 4.0)) > 1.0:
                continue
            if any(
                _segment_distance(np.array(n.centre), a, b) < n.diameter_mm / 2 + diameter / 2 + 5.0
                for n in nodules
            ):
                continue
            tubes.append(
                Tube(
                    start=(float(a[0]), float(a[1]), float(a[2])),
                    end=(float(b[0]), float(b[1]), float(b[2])),
                    diameter_mm=float(diameter),
                )
            )
            break
    return tuple(tubes)


def _fraction(
    phantom: Phantom,
    lo_mm: np.ndarray,
    hi_mm: np.ndarray,
    inside: Callable[[np.ndarray], np.ndarray],
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Box, voxel fraction and centre mask of the set ``inside`` (points ``(..., 3)`` in LPS mm).

    Supersampled with samples ~0.5 mm apart along every axis, so a thick slice integrates the
    object over its whole thickness like a scanner's slice profile (not just at two planes).
    """
    affine = phantom.affine
    inv = np.linalg.inv(affine)
    shape = phantom.hu.shape
    corners = (
        np.array(
            [
                [x, y, z, 1.0]
                for x in (lo_mm[0], hi_mm[0])
                for y in (lo_mm[1], hi_mm[1])
                for z in (lo_mm[2], hi_mm[2])
            ]
        )
        @ inv.T
    )
    lo = np.maximum(np.floor(corners[:, :3].min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(corners[:, :3].max(axis=0)).astype(int) + 2, shape)
    box = tuple(slice(int(lo[i]), int(hi[i])) for i in range(3))
    grids = np.meshgrid(
        *(np.arange(lo[i], hi[i], dtype=np.float64) for i in range(3)), indexing="ij"
    )
    counts = [max(2, int(np.ceil(s / 0.5))) for s in phantom.spacing]
    offsets = [(np.arange(c) + 0.5) / c - 0.5 for c in counts]
    frac = np.zeros(grids[0].shape)
    for dk in offsets[0]:
        for dj in offsets[1]:
            for di in offsets[2]:
                idx = np.stack([grids[0] + dk, grids[1] + dj, grids[2] + di], axis=-1)
                frac += inside(idx @ affine[:3, :3].T + affine[:3, 3])
    frac /= float(np.prod(counts))
    centre = inside(np.stack(grids, axis=-1) @ affine[:3, :3].T + affine[:3, 3])
    return box, frac, centre


def add_tubes(phantom: Phantom, tubes: Sequence[Tube]) -> None:
    """Render ``tubes`` into the lungs of ``phantom`` with partial volume; masks ``vessel_<i>``."""
    for n, tube in enumerate(tubes):
        a, b = np.array(tube.start), np.array(tube.end)
        r = tube.diameter_mm / 2.0

        def inside(
            pts: np.ndarray, a: np.ndarray = a, b: np.ndarray = b, r: float = r
        ) -> np.ndarray:
            ab = b - a
            t = np.clip(((pts - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
            return np.asarray(np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1) <= r)

        box, frac, centre = _fraction(phantom, np.minimum(a, b) - r, np.maximum(a, b) + r, inside)
        lungs = phantom.masks["lungs"][box]
        region = phantom.hu[box]
        region += np.where(lungs, frac, 0.0).astype(np.float32) * (tube.hu - region)
        mask = np.zeros(phantom.hu.shape, dtype=bool)
        mask[box] = centre & lungs
        phantom.masks[f"vessel_{n}"] = mask


def add_spheres(phantom: Phantom, spheres: Sequence[Sphere]) -> None:
    """Render nodules with partial volume over the full slice thickness; masks ``nodule_<i>``."""
    body = phantom.masks["body"]
    for n, sphere in enumerate(spheres):
        c = np.array(sphere.centre)
        r = sphere.diameter_mm / 2.0

        def inside(pts: np.ndarray, c: np.ndarray = c, r: float = r) -> np.ndarray:
            return np.asarray(np.sum((pts - c) ** 2, axis=-1) <= r * r)

        box, frac, centre = _fraction(phantom, c - r, c + r, inside)
        region = phantom.hu[box]
        region += np.where(body[box], frac, 0.0).astype(np.float32) * (sphere.hu - region)
        mask = np.zeros(phantom.hu.shape, dtype=bool)
        mask[box] = centre
        phantom.masks[f"nodule_{n}"] = mask
        phantom.volumes_ml[f"nodule_{n}"] = sphere.volume_ml
    phantom.nodules = tuple(spheres)


def make_nodule_phantom(
    spec: ChestSpec,
    diameters: Sequence[float] = (),
    placements: Sequence[Placement] | None = None,
    *,
    vessels: int = 6,
    seed: int = 0,
    embed_fraction: float = 0.2,
) -> NodulePhantom:
    """Render a chest phantom with seeded nodules (``diameters`` at ``placements``) and vessels."""
    free: Placement = "free"
    default = (free,) * len(diameters)
    chosen = tuple(placements) if placements is not None else default
    nodules = place_nodules(spec, diameters, chosen, seed, embed_fraction=embed_fraction)
    tubes = place_tubes(spec, nodules, vessels, seed)
    # Nodules and tubes are rendered here rather than by make_chest_phantom, so that their
    # partial volume integrates over the whole slice thickness (thick slices matter here).
    phantom = make_chest_phantom(replace(spec, nodules=()))
    add_spheres(phantom, nodules)
    add_tubes(phantom, tubes)
    return NodulePhantom(phantom=phantom, placements=chosen, tubes=tubes)


@dataclass
class Match:
    """One true nodule and the finding matched to it (``segment`` None: missed)."""

    diameter_mm: float
    placement: str
    segment: Segment | None
    centre_error_mm: float | None
    volume_ml: float = 0.0


def match_findings(case: NodulePhantom, prediction: Prediction) -> tuple[list[Match], list[Segment]]:
    """Pair each true nodule with the nearest unused finding whose centre lies within it (or
    within 3 mm); return the matches and the unmatched findings (false positives)."""
    used: set[int] = set()
    matches = []
    for nodule, placement in zip(case.phantom.nodules, case.placements, strict=True):
        best, best_d = None, float("inf")
        for j, seg in enumerate(prediction.segments):
            assert seg.centre is not None
            d = float(np.linalg.norm(np.array(seg.centre) - np.array(nodule.centre)))
            if j not in used and d <= max(nodule.diameter_mm / 2.0, 3.0) and d < best_d:
                best, best_d = j, d
        if best is None:
            matches.append(Match(nodule.diameter_mm, placement, None, None, nodule.volume_ml))
        else:
            used.add(best)
            matches.append(Match(nodule.diameter_mm, placement, prediction.segments[best], best_d, nodule.volume_ml))
    false_positives = [s for j, s in enumerate(prediction.segments) if j not in used]
    return matches, false_positives
