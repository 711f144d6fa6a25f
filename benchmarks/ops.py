"""Hand-written mask operations against the libraries: ``python -m benchmarks.ops``.

Times each operation the ``ct-tissue`` and ``foreground`` models use, once with the
hand-written torch implementation the project had (``inference/ops.py`` read from git at
``--rev``, the last commit that holds it) and once with the library call that replaced it
(MONAI, ``scipy.ndimage``, scikit-image, plain torch), in the same run on the same CT-like
volume (a chest phantom, default 300 x 512 x 512 at 0.7 x 0.7 x 1.25 mm).  Prints the median
of ``--repeat`` runs of each, the ratio hand-written / library (above 1: the library is
faster), the memory each needs above the inputs (peak RSS of its first run) and whether the two
results agree.  CPU only; run by hand, not in the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch
from monai.transforms.utils import get_largest_connected_component_mask
from skimage.filters import threshold_otsu

from dicom_node.demo import ChestSpec, make_chest_phantom
from inference import ops

#: Last commit with the hand-written torch operations in inference/ops.py.
HAND_WRITTEN_REV = "157f181"
ROOT = Path(__file__).resolve().parent.parent


def hand_written(rev: str) -> types.ModuleType:
    """The hand-written ``inference/ops.py`` of commit ``rev``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:inference/ops.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("hand_written_ops")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:inference/ops.py", "exec"), module.__dict__)  # noqa: S102
    return module


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median seconds of ``repeat`` runs, and MiB of memory the first run needed above what
    was resident before it (peak RSS, reset through ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    times = [time.perf_counter() - start]
    extra_mib = (_status_kib("VmHWM") - before) / 1024
    del result
    for _ in range(repeat - 1):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), extra_mib, result


def _np(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rev", default=HAND_WRITTEN_REV)
    parser.add_argument("--only", default="", help="run only the operations whose name has this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = hand_written(args.rev)

    spec = ChestSpec(
        rows=args.pixels, columns=args.pixels, slices=args.slices, pixel_spacing=0.7, slice_spacing=1.25,
        lung_axes=(45.0, 60.0, 150.0), noise_hu=20.0,
    )
    t0 = time.perf_counter()
    phantom = make_chest_phantom(spec)
    print(f"phantom {phantom.hu.shape} rendered in {time.perf_counter() - t0:.1f} s, torch threads "
          f"{torch.get_num_threads()}")
    hu = torch.as_tensor(phantom.hu.astype(np.float32))
    body = torch.as_tensor(phantom.masks["body"])
    candidate = hu > -500
    air = hu < -400
    outside = ~body
    spacing = (1.25, 0.7, 0.7)
    _, ry, rx = ops.radius_in_voxels(3.0, spacing)
    plane = (0, ry, rx)
    min_voxels = 20_000

    def scipy_morphology(mask: torch.Tensor, radius: tuple[int, int, int], kind: str) -> np.ndarray:
        element = ops.ellipsoid(radius)
        array = mask.numpy()
        if kind == "dilation":
            return ndi.binary_dilation(array, structure=element)
        if kind == "erosion":
            return ndi.binary_erosion(array, structure=element, border_value=1)
        dilated = ndi.binary_dilation(array, structure=element)
        return ndi.binary_erosion(dilated, structure=element, border_value=1)

    def fill_holes_slice_by_slice(mask: torch.Tensor) -> np.ndarray:
        array = mask.numpy()
        return np.stack([ndi.binary_fill_holes(s) for s in array])

    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "largest component (6-conn), MONAI",
            lambda: old.largest_component(candidate, connectivity=6),
            lambda: get_largest_connected_component_mask(candidate, connectivity=1),
        ),
        (
            "remove small components (6-conn), ndi.label",
            lambda: old.remove_small_components(air & body, min_voxels, 6, min_fraction=0.05),
            lambda: ops.remove_small_components(air & body, min_voxels, 6, min_fraction=0.05),
        ),
        (
            "components touching seeds (6-conn), ndi.label",
            lambda: old.components_touching(air, outside, connectivity=6),
            lambda: ops.components_touching(air, outside, connectivity=6),
        ),
        (
            "fill holes per slice, ndi.binary_fill_holes x slices",
            lambda: old.fill_holes(body, per_slice=True),
            lambda: fill_holes_slice_by_slice(body),
        ),
        (
            "fill holes per slice, ndi.label in-plane (ops)",
            lambda: old.fill_holes(body, per_slice=True),
            lambda: ops.fill_holes_per_slice(body),
        ),
        (
            f"erosion, in-plane ellipse {plane}, ndi",
            lambda: old.binary_erosion(candidate, plane),
            lambda: scipy_morphology(candidate, plane, "erosion"),
        ),
        (
            f"dilation, in-plane ellipse {(0, ry + 1, rx + 1)}, ndi",
            lambda: old.binary_dilation(body, (0, ry + 1, rx + 1)),
            lambda: scipy_morphology(body, (0, ry + 1, rx + 1), "dilation"),
        ),
        (
            "dilation, 6-neighbourhood (1, 1, 1), ndi",
            lambda: old.binary_dilation(air, (1, 1, 1)),
            lambda: scipy_morphology(air, (1, 1, 1), "dilation"),
        ),
        (
            f"closing, in-plane ellipse {plane}, ndi",
            lambda: old.binary_closing(candidate, plane),
            lambda: scipy_morphology(candidate, plane, "closing"),
        ),
        (
            "Otsu threshold, skimage",
            lambda: old.otsu_threshold(hu),
            lambda: float(threshold_otsu(hu.numpy())),
        ),
        (
            "masked mean, torch values[mask] (1 volume)",
            lambda: old.masked_mean(hu, body),
            lambda: float(hu[body].to(torch.float64).mean()),
        ),
    ]
    print(f"{'operation':50s} {'hand-written':>12s} {'library':>9s} {'ratio':>6s} "
          f"{'MiB hand':>9s} {'MiB lib':>8s}  agree")
    for name, before, after in cases:
        if args.only not in name:
            continue
        t_old, m_old, r_old = measure(before, args.repeat)
        t_new, m_new, r_new = measure(after, args.repeat)
        if isinstance(r_old, float):
            agree = f"{r_old:.3f} vs {r_new:.3f}"
        else:
            differ = int(np.count_nonzero(_np(r_old) != _np(r_new)))
            agree = "identical" if differ == 0 else f"{differ} voxels differ"
        print(f"{name:50s} {t_old:10.2f} s {t_new:7.2f} s {t_old / t_new:6.2f} {m_old:9.0f} {m_new:8.0f}"
              f"  {agree}", flush=True)


if __name__ == "__main__":
    main()
