"""Benchmark ``dicom_node.results.encode_results`` on a 500-slice 512x512 CT with 4 segments.

``python -m benchmarks.encode [--runs 3] [--with-pixels]`` runs each encode in a fresh child
process (so the peak RSS of one encode is measured alone: ``ru_maxrss`` of that child), and
prints the median wall time, CPU time and the peak RSS against the targets (<= 3 s, <= 2 GB).

The inputs mirror a worker's: source datasets without pixel data (the worker reads them with
``stop_before_pixels=True``: highdicom only reads headers; ``--with-pixels`` keeps the pixel
data to show it is not copied), a body and a lungs region and two spherical nodules (lesions
with key slice, outline and centre), masks in the volume grid.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from dicom_node.demo import axial_affine, slice_datasets
from dicom_node.results import encode_results
from inference.prediction import DIAMETER, ML, MM, VOLUME, Measurement, Prediction, Segment
from inference.volume import Volume
from tests.support.result_examples import (
    BODY_LABEL,
    LUNG_LABEL,
    NODULE_LABEL,
    circle_outline,
    example_series_info,
)

SHAPE = (500, 512, 512)
SPACING = 0.7
TARGET_SECONDS = 3.0
TARGET_BYTES = 2 * 1024**3


def _masks(affine: np.ndarray) -> dict[str, np.ndarray]:
    """Body, lungs and two nodules, filled slice by slice (no full-size float temporaries)."""
    slices, rows, cols = SHAPE
    x = (affine[0, 3] + np.arange(cols) * SPACING)[None, :]
    y = (affine[1, 3] + np.arange(rows) * SPACING)[:, None]
    out = {name: np.zeros(SHAPE, dtype=bool) for name in ("body", "lungs", "nodule_1", "nodule_2")}
    body = (x / 160.0) ** 2 + (y / 120.0) ** 2 <= 1.0
    for k in range(slices):
        z = affine[2, 3] + k * SPACING
        out["body"][k] = body
        for sign in (-1.0, 1.0):
            out["lungs"][k] |= ((x - sign * 70) / 50) ** 2 + (y / 65) ** 2 + (z / 150) ** 2 <= 1.0
        out["nodule_1"][k] = (x + 60) ** 2 + (y - 10) ** 2 + (z - 5) ** 2 <= 10.0**2
        out["nodule_2"][k] = (x - 60) ** 2 + (y + 10) ** 2 + (z + 30) ** 2 <= 6.0**2
    return out


def _inputs(with_pixels: bool) -> tuple[Prediction, Volume, list[Any], list[tuple[int, int]]]:
    affine = axial_affine(SHAPE, SPACING, SPACING)
    zeros = np.broadcast_to(np.float32(0.0), SHAPE)
    sources = slice_datasets(zeros, affine, example_series_info())
    if not with_pixels:
        for ds in sources:
            del ds.PixelData
    refs = [(k, 1) for k in range(SHAPE[0])]
    volume = Volume(array=zeros, affine=affine, modality="CT")
    masks = _masks(affine)
    voxel_ml = volume.voxel_volume_ml

    def volume_ml(mask: np.ndarray) -> Measurement:
        return Measurement(VOLUME, round(float(mask.sum()) * voxel_ml, 3), ML)

    segments = [
        Segment(BODY_LABEL, masks["body"], [volume_ml(masks["body"])]),
        Segment(LUNG_LABEL, masks["lungs"], [volume_ml(masks["lungs"])]),
    ]
    for i, (centre, diameter) in enumerate(
        (((-60.0, 10.0, 5.0), 20.0), ((60.0, -10.0, -30.0), 12.0)), start=1
    ):
        mask = masks[f"nodule_{i}"]
        key = int(np.argmax(mask.sum(axis=(1, 2))))
        segments.append(
            Segment(
                NODULE_LABEL,
                mask,
                [volume_ml(mask), Measurement(DIAMETER, diameter, MM)],
                tracking_id=f"Nodule {i}",
                confidence=0.9,
                centre=centre,
                key_slice=key,
                outline=circle_outline(volume, key, np.asarray(centre), diameter / 2.0),
            )
        )
    return Prediction("ct-tissue", "1.0.0", segments), volume, sources, refs


def child(with_pixels: bool) -> dict[str, float]:
    """One measured encode (run in its own process)."""
    prediction, volume, sources, refs = _inputs(with_pixels)
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall, cpu = time.perf_counter(), time.process_time()
    result = encode_results(prediction, volume, sources, refs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert result.seg is not None
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "setup_rss_bytes": float(setup_rss),
        "peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "seg_frames": float(result.seg.NumberOfFrames),
        "seg_pixel_bytes": float(len(result.seg.PixelData)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (exit 1 when a target is missed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--with-pixels", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.with_pixels)))
        return 0
    runs = []
    for _ in range(args.runs):
        cmd = [sys.executable, "-m", "benchmarks.encode", "--child"]
        cmd += ["--with-pixels"] if args.with_pixels else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    peak = max(max(r["peak_rss_bytes"] for r in runs), children_peak)
    setup = max(r["setup_rss_bytes"] for r in runs)
    gib = 1024**3
    print(f"encode_results, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} CT, 4 segments, "
          f"sources {'with' if args.with_pixels else 'without'} pixel data, {args.runs} runs")
    each = ", ".join(f"{r['wall_s']:.2f}" for r in runs)
    print(f"  wall  median {wall:.2f} s  (runs: {each})  target <= {TARGET_SECONDS:.0f} s")
    print(f"  cpu   median {cpu:.2f} s")
    print(f"  peak RSS {peak / gib:.2f} GiB (inputs alone {setup / gib:.2f} GiB)  target <= 2 GiB")
    frames, size = runs[0]["seg_frames"], runs[0]["seg_pixel_bytes"] / 2**20
    print(f"  SEG: {frames:.0f} frames, {size:.1f} MiB")
    return 0 if wall <= TARGET_SECONDS and peak <= TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
