"""Benchmark of ``ct-lung-nodules`` on seeded chest phantoms: ``python -m benchmarks.nodules``.

Ten scans at 0.7 x 0.7 mm pixels, 320 x 320, slices 1.25-2.5 mm, each with free and
juxtapleural (wall / mediastinum) nodules of 4-30 mm and vessel-like tubes.  Prints recall by
size bin, centre error, diameter and volume error, false positives per scan and run time.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from inference.models.lung_nodules import LungNoduleModel
from inference.prediction import DIAMETER, VOLUME
from inference.volume import Volume
from tests.support.chest_nodules import Placement, chest_spec, make_nodule_phantom, match_findings

SLICES_MM = (1.25, 1.5, 2.0, 2.5)
DIAMETERS = (4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 7.0, 10.0, 14.0, 18.0, 24.0)
PLACEMENTS: tuple[Placement, ...] = ("free",) * 9 + (
    "lateral",
    "mediastinal",
    "anterior",
    "posterior",
    "lateral",
)
BINS = ((4.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 31.0))


@dataclass
class Row:
    diameter: float
    placement: str
    found: bool
    centre_error: float = float("nan")
    diameter_error: float = float("nan")
    volume_error: float = float("nan")


def run(scans: int, size: int, seed: int) -> None:
    """Generate ``scans`` phantoms, run the model on each and print the figures."""
    model = LungNoduleModel(torch.device("cpu"))
    rows: list[Row] = []
    false_positives: list[int] = []
    times: list[float] = []
    shapes: list[tuple[int, ...]] = []
    for i in range(scans):
        slice_mm = SLICES_MM[i % len(SLICES_MM)]
        spec = chest_spec(
            rows=size,
            columns=size,
            slices=round(150.0 / slice_mm),
            pixel_spacing=0.7,
            slice_spacing=slice_mm,
            scale=0.7,
            noise_hu=20.0,
            seed=seed + i,
        )
        case = make_nodule_phantom(spec, DIAMETERS, PLACEMENTS, vessels=14, seed=seed + i)
        volume = Volume(case.phantom.hu, case.phantom.affine, "CT")
        shapes.append(volume.shape)
        start = time.perf_counter()
        prediction = model.predict(volume)
        times.append(time.perf_counter() - start)
        matches, unmatched = match_findings(case, prediction)
        for m in matches:
            if m.segment is None or m.centre_error_mm is None:
                rows.append(Row(m.diameter_mm, m.placement, False))
                continue
            values = {v.name: v.value for v in m.segment.measurements}
            rows.append(Row(m.diameter_mm, m.placement, True, m.centre_error_mm,
                            values[DIAMETER] / m.diameter_mm - 1.0, values[VOLUME] / m.volume_ml - 1.0))
        false_positives.append(len(unmatched))

    print(f"ct-lung-nodules on {scans} phantoms, 0.7 mm pixels, shapes {sorted(set(shapes))}")
    print(f"slices {', '.join(map(str, SLICES_MM))} mm; nodules per scan {len(DIAMETERS)}")
    for lo, hi in BINS:
        in_bin = [r for r in rows if lo <= r.diameter < hi]
        found = sum(r.found for r in in_bin)
        print(
            f"  recall {lo:>4.0f}-{hi:<3.0f} mm: {found}/{len(in_bin)} = {found / len(in_bin):.3f}"
        )
    for group in ("free", "wall"):
        sel = [r for r in rows if (r.placement == "free") == (group == "free")]
        print(f"  recall {group:>12}: {sum(r.found for r in sel)}/{len(sel)}")
    big = [r for r in rows if r.diameter >= 6.0]
    print(f"  recall >= 6 mm: {sum(r.found for r in big) / len(big):.3f}")
    hits = [r for r in rows if r.found]
    centre = np.array([r.centre_error for r in hits])
    diam = np.abs(np.array([r.diameter_error for r in hits]))
    vol_free = np.abs(np.array([r.volume_error for r in hits if r.placement == "free"]))
    print(f"  centre error mm: mean {centre.mean():.2f}, max {centre.max():.2f}")
    print(f"  |diameter error|: mean {100 * diam.mean():.1f} %, max {100 * diam.max():.1f} %")
    print(
        f"  |volume error| free nodules: mean {100 * vol_free.mean():.1f} %,"
        f" max {100 * vol_free.max():.1f} %"
    )
    print(
        f"  false positives per scan: mean {np.mean(false_positives):.2f},"
        f" max {max(false_positives)}"
    )
    print(
        f"  run time per scan s: mean {np.mean(times):.2f}, max {max(times):.2f}"
        f" (CPU, {torch.get_num_threads()} threads)"
    )


def main() -> None:
    """Command line: ``python -m benchmarks.nodules [--scans N] [--size PIXELS] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=10)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()
    run(args.scans, args.size, args.seed)


if __name__ == "__main__":
    main()
