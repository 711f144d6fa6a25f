"""Benchmark ``dicom_node.imaging.loading.load_series`` on a 500-slice 512x512 CT series.

``python -m benchmarks.load`` writes the series once under ``--workdir``: native, then
compressed copies (``--codecs``: JPEG-LS, JPEG lossless SV1 and RLE through DCMTK when
installed, JPEG 2000 lossless through pydicom's openjpeg encoder, which takes about a minute).
It times the loader, median of ``--repeats`` runs, against SimpleITK's ``ImageSeriesReader``
(GDCM) in the same run when SimpleITK is importable, and prints the ratio.  Both readers parse
headers, sort by position and return rescaled voxels; the values are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless

from dicom_node.demo import ChestSpec, axial_affine, make_chest_phantom, write_datasets
from dicom_node.imaging.loading import load_series
from tests.support import procs, quirks


def write_series(out: Path, slices: int, size: int) -> list[Path]:
    """Write a ``slices`` x ``size`` x ``size`` CT series (a small phantom scaled up, in chunks)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.dcm"))
    if len(existing) == slices:
        return existing
    for old in existing:
        old.unlink()
    factor = max(1, size // 128)
    small = make_chest_phantom(
        ChestSpec(
            rows=size // factor,
            columns=size // factor,
            slices=64,
            pixel_spacing=0.7 * factor,
            slice_spacing=1.0,
        )
    )
    hu = np.repeat(np.repeat(small.hu, factor, axis=1), factor, axis=2)
    affine = axial_affine((slices, size, size), 0.7, 1.0)
    base = quirks.series_info("bench-load")
    chunk = 50
    paths: list[Path] = []
    for start in range(0, slices, chunk):
        n = min(chunk, slices - start)
        part = affine.copy()
        part[:3, 3] = affine[:3, 3] + start * affine[:3, 0]
        info = quirks.series_info(
            f"bench-load-{start}",
            study_uid=base.study_uid,
            series_uid=base.series_uid,
            frame_of_reference_uid=base.frame_of_reference_uid,
        )
        block = hu[[(start + k) % hu.shape[0] for k in range(n)]]
        datasets = quirks.stack(block, part, info)
        for k, ds in enumerate(datasets):
            ds.InstanceNumber = start + k + 1
        paths.extend(write_datasets(datasets, out))
    return paths


#: Compressed copies: name -> DCMTK codec of ``quirks.DCMTK_CODECS`` (None: pydicom's encoder).
CODECS: dict[str, str | None] = {
    "jpeg-ls": "jpeg-ls-lossless",
    "jpeg-lossless": "jpeg-lossless-sv1",
    "rle": "rle",
    "jpeg-2000": None,
}


def compressed_series(native: list[Path], out: Path, name: str) -> list[Path] | None:
    """The ``name`` copy of ``native`` under ``out`` (written once), or None without its encoder."""
    existing = sorted(out.glob("*.dcm")) if out.exists() else []
    if len(existing) == len(native):
        return existing
    codec = CODECS[name]
    if codec is not None and not procs.tool_path(quirks.DCMTK_CODECS[codec][0]):
        return None
    shutil.rmtree(out, ignore_errors=True)
    if codec is not None:
        return quirks.dcmtk_compress(native, out, codec)
    out.mkdir(parents=True)
    for path in native:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(out / path.name, enforce_file_format=True)
    return sorted(out.glob("*.dcm"))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sitk_reader(directory: Path) -> Callable[[], np.ndarray] | None:
    """A SimpleITK series read of ``directory`` (sorting included), or None without SimpleITK."""
    try:
        # Optional comparison only: SimpleITK is not a dependency of the package.
        import SimpleITK as sitk
    except ImportError:
        return None

    def read() -> np.ndarray:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
        return np.asarray(sitk.GetArrayFromImage(reader.Execute()))

    return read


def run(label: str, paths: list[Path], repeats: int) -> None:
    """Time both readers on ``paths`` and print one line."""
    ours = median_seconds(lambda: load_series(paths), repeats)
    voxels = load_series(paths).volume.array
    shape = f"{len(paths)} x {voxels.shape[1]}x{voxels.shape[2]}"
    line = f"{label:<13} {shape}: load_series {ours:6.2f} s"
    read = sitk_reader(paths[0].parent)
    if read is None:
        print(line + "   (SimpleITK not installed: no comparison)")
        return
    theirs = median_seconds(read, repeats)
    same = np.array_equal(read().astype(np.float32), voxels)
    print(
        line + f"   SimpleITK {theirs:6.2f} s   ratio ours/SimpleITK {ours / theirs:5.2f}"
        f"   voxels identical: {same}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.load``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench/load"))
    parser.add_argument("--codecs", default=",".join(CODECS),
                        help=f"compressed copies to time, comma-separated, of {', '.join(CODECS)}")
    parser.add_argument("--keep", action="store_true", help="keep the written series")
    args = parser.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        parser.error(f"unknown codec(s) {', '.join(unknown)}; choose from {', '.join(CODECS)}")
    native_dir = args.workdir / "native"
    t0 = time.perf_counter()
    native = write_series(native_dir, args.slices, args.size)
    print(f"series ready in {time.perf_counter() - t0:.1f} s ({native_dir}); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    run("native", native, args.repeats)
    for name in codecs:
        paths = compressed_series(native, args.workdir / name, name)
        if paths is None:
            print(f"{name:<13} skipped: {quirks.DCMTK_CODECS[CODECS[name] or ''][0]} not installed")
            continue
        run(name, paths, args.repeats)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
