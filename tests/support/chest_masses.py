"""Chest phantoms with lung masses against the mediastinum, the chest wall and the diaphragm.

Built on :mod:`dicom_node.demo` and :mod:`tests.support.chest_nodules`: a chest
of adult size (lungs 90 x 120 x 180 mm) whose lung bases sit on a diaphragm dome, with masses of
known diameter and the density of the wall they touch (so only their shape tells them apart),
nodules, and vessel-like tubes.  Seeded: tests and benchmarks see the same cases every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from dicom_node.demo import SOFT_TISSUE_HU, ChestSpec, Phantom, Sphere, make_chest_phantom
from inference.prediction import DIAMETER, Prediction, Segment
from tests.support.chest_nodules import (
    Placement,
    Tube,
    _fraction,
    _wall_point,
    add_spheres,
    add_tubes,
    chest_spec,
    place_tubes,
)

#: Where a lesion sits: free in the lung, or against the mediastinum, the lateral / anterior /
#: posterior chest wall, or the diaphragm.
Site = Literal["free", "mediastinal", "lateral", "anterior", "posterior", "diaphragmatic"]
#: Long-axis diameter above which a lesion is a mass (below or equal: a nodule).
NODULE_MAX_MM = 30.0


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion of known centre (LPS mm), diameter and site."""

    centre: tuple[float, float, float]
    diameter_mm: float
    site: Site

    @property
    def kind(self) -> str:
        return "Mass" if self.diameter_mm > NODULE_MAX_MM else "Nodule"


@dataclass(frozen=True)
class Dome:
    """The diaphragm under one lung: an ellipsoid of soft tissue (centre and semi-axes, mm)."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]

    def top(self) -> np.ndarray:
        return np.array([self.centre[0], self.centre[1], self.centre[2] + self.axes[2]])


@dataclass
class MassPhantom:
    """A chest phantom with lesions (masses and nodules), diaphragm domes and vessels."""

    phantom: Phantom
    lesions: tuple[Lesion, ...]
    domes: tuple[Dome, ...] = ()
    tubes: tuple[Tube, ...] = field(default_factory=tuple)


def mass_spec(
    *, pixel_spacing: float = 1.4, slice_spacing: float = 2.5, noise_hu: float = 15.0, seed: int = 0
) -> ChestSpec:
    """An adult-size chest (body 300 x 220 mm) covering the lungs from apex to base."""
    return chest_spec(
        rows=round(240 / pixel_spacing),
        columns=round(320 / pixel_spacing),
        slices=round(200 / slice_spacing),
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        scale=1.0,
        noise_hu=noise_hu,
        seed=seed,
    )


def domes(spec: ChestSpec) -> tuple[Dome, ...]:
    """One diaphragm dome per lung, rising 40 % of the lung's half-height into its base."""
    lx, ly, lz = spec.lung_axes
    return tuple(
        Dome(centre=(side * spec.lung_offset_x, 5.0, -0.75 * lz), axes=(0.75 * lx, 0.75 * ly, 0.35 * lz))
        for side in (-1.0, 1.0)
    )


def add_domes(phantom: Phantom, dome_list: Sequence[Dome]) -> None:
    """Fill the lung under each dome with soft tissue (partial volume); the lungs mask follows."""
    for dome in dome_list:
        c, axes = np.array(dome.centre), np.array(dome.axes)

        def inside(pts: np.ndarray, c: np.ndarray = c, axes: np.ndarray = axes) -> np.ndarray:
            return np.asarray(np.sum(((pts - c) / axes) ** 2, axis=-1) <= 1.0)

        box, frac, centre = _fraction(phantom, c - axes, c + axes, inside)
        lungs = phantom.masks["lungs"][box]
        region = phantom.hu[box]
        near_lung = np.asarray(region < -200.0)
        region += np.where(near_lung, frac, 0.0).astype(np.float32) * (SOFT_TISSUE_HU - region)
        phantom.masks["lungs"][box] = lungs & ~centre


def _inside_lung(spec: ChestSpec, dome_list: Sequence[Dome], p: np.ndarray, side: float, margin: float) -> bool:
    lx, ly, lz = (a - margin for a in spec.lung_axes)
    x, y, z = p[0] - side * spec.lung_offset_x, p[1], p[2]
    if (x / lx) ** 2 + (y / ly) ** 2 + (z / lz) ** 2 > 1.0:
        return False
    dome = dome_list[0 if side < 0 else 1]
    axes = np.array(dome.axes) + margin
    return bool(np.sum(((p - np.array(dome.centre)) / axes) ** 2) > 1.0)


def place_lesions(
    spec: ChestSpec,
    lesions: Sequence[tuple[float, Site]],
    seed: int,
    *,
    embed_fraction: float = 0.25,
) -> tuple[Lesion, ...]:
    """Seeded, non-overlapping lesions; wall lesions are embedded ``embed_fraction`` of a radius."""
    rng = np.random.default_rng(seed)
    dome_list = domes(spec)
    placed: list[Lesion] = []
    lz = spec.lung_axes[2]
    for diameter, site in lesions:
        r = diameter / 2.0
        for _ in range(4000):
            side = float(rng.choice([-1.0, 1.0]))
            if site == "diaphragmatic":
                dome = dome_list[0 if side < 0 else 1]
                tilt = rng.uniform(-0.25, 0.25, size=2)
                normal = np.array([tilt[0], tilt[1], 1.0])
                normal /= np.linalg.norm(normal)
                a = np.array(dome.axes)
                # The point of the dome in direction ``normal`` from its centre, and its outward normal.
                scale = 1.0 / np.sqrt(np.sum((normal / a) ** 2))
                surface = np.array(dome.centre) + normal * scale
                outward = (surface - np.array(dome.centre)) / a**2
                outward /= np.linalg.norm(outward)
                centre = surface + outward * r * (1.0 - embed_fraction)
                if not _inside_lung(spec, dome_list, centre + np.array([0.0, 0.0, r]), side, 0.0):
                    continue
            else:
                z = rng.uniform(-0.3 * lz, 0.45 * lz)
                if site == "free":
                    lx, ly, _ = spec.lung_axes
                    centre = np.array([side * spec.lung_offset_x + rng.uniform(-lx, lx), rng.uniform(-ly, ly), z])
                    if not _inside_lung(spec, dome_list, centre, side, r + 3.0):
                        continue
                else:
                    wall: Placement = site
                    point, normal = _wall_point(spec, rng, side, wall, z)
                    centre = point + normal * r * (1.0 - embed_fraction)
                    # The lesion's far side stays clear of the opposite wall (air around it).
                    if not _inside_lung(spec, dome_list, centre + normal * r, side, min(8.0, r)):
                        continue
            if any(
                np.linalg.norm(centre - np.array(o.centre)) < r + o.diameter_mm / 2.0 + 8.0 for o in placed
            ):
                continue
            placed.append(Lesion((float(centre[0]), float(centre[1]), float(centre[2])), float(diameter), site))
            break
        else:
            raise ValueError(f"could not place a {diameter} mm {site} lesion in the phantom")
    return tuple(placed)


def make_mass_phantom(
    spec: ChestSpec,
    lesions: Sequence[tuple[float, Site]] = (),
    *,
    vessels: int = 12,
    seed: int = 0,
    embed_fraction: float = 0.25,
) -> MassPhantom:
    """Render a chest with diaphragm domes, seeded lesions ``(diameter mm, site)`` and vessels."""
    placed = place_lesions(spec, lesions, seed, embed_fraction=embed_fraction)
    dome_list = domes(spec)
    spheres = tuple(Sphere(centre=les.centre, diameter_mm=les.diameter_mm, hu=SOFT_TISSUE_HU) for les in placed)
    phantom = make_chest_phantom(replace(spec, nodules=()))
    add_domes(phantom, dome_list)
    tubes = tuple(
        t for t in place_tubes(spec, spheres, vessels, seed)
        if all(
            _inside_lung(spec, dome_list, np.array(p), np.sign(p[0]) or 1.0, 3.0)
            for p in (t.start, t.end)
        )
    )
    add_spheres(phantom, spheres)
    add_tubes(phantom, tubes)
    return MassPhantom(phantom=phantom, lesions=placed, domes=dome_list, tubes=tubes)


@dataclass
class LesionMatch:
    """One true lesion and the finding matched to it (``segment`` None: missed)."""

    lesion: Lesion
    segment: Segment | None
    centre_error_mm: float | None

    @property
    def diameter_mm(self) -> float | None:
        if self.segment is None:
            return None
        return next(m.value for m in self.segment.measurements if m.name == DIAMETER)


def match_lesions(case: MassPhantom, prediction: Prediction) -> tuple[list[LesionMatch], list[Segment]]:
    """Pair each true lesion with the nearest unused finding whose centre lies within its radius
    (at least 3 mm); return the matches and the unmatched findings (false positives)."""
    used: set[int] = set()
    matches = []
    for lesion in case.lesions:
        best, best_d = None, float("inf")
        for j, seg in enumerate(prediction.segments):
            assert seg.centre is not None
            d = float(np.linalg.norm(np.array(seg.centre) - np.array(lesion.centre)))
            if j not in used and d <= max(lesion.diameter_mm / 2.0, 3.0) and d < best_d:
                best, best_d = j, d
        if best is None:
            matches.append(LesionMatch(lesion, None, None))
        else:
            used.add(best)
            matches.append(LesionMatch(lesion, prediction.segments[best], best_d))
    return matches, [s for j, s in enumerate(prediction.segments) if j not in used]


#: The phantom set of the tests and docs/models.md: (pixel mm, slice mm, seed, lesions).
MASS_SET: tuple[tuple[float, float, int, tuple[tuple[float, Site], ...]], ...] = (
    (1.4, 2.5, 1, ((60.0, "mediastinal"), (45.0, "lateral"), (50.0, "diaphragmatic"), (12.0, "free"))),
    (1.2, 5.0, 2, ((80.0, "mediastinal"), (35.0, "posterior"), (40.0, "diaphragmatic"), (8.0, "anterior"))),
    (1.4, 1.25, 3, ((40.0, "mediastinal"), (70.0, "anterior"), (20.0, "diaphragmatic"), (25.0, "lateral"))),
    (1.0, 8.0, 4, ((50.0, "mediastinal"), (55.0, "lateral"), (45.0, "diaphragmatic"), (10.0, "free"))),
    (1.4, 2.5, 5, ()),
)


def mass_set_case(index: int) -> MassPhantom:
    """Case ``index`` of :data:`MASS_SET`, rendered."""
    pixel, slice_mm, seed, lesions = MASS_SET[index]
    return make_mass_phantom(mass_spec(pixel_spacing=pixel, slice_spacing=slice_mm, seed=seed), lesions, seed=seed)
