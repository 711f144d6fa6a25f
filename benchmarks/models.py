"""Per-model inference time and peak memory (on the CPU, and on CUDA where present), and a MONAI
bundle's overhead against the same network as a TorchScript card model:
``python -m benchmarks.models [--device auto|cpu|cuda:N]``.

The tiny bundle and nnU-Net folder of ``tests.support.tiny_models`` are trained on the
test phantom, then every model runs on one larger seeded chest phantom, each in its own child
process that loads the model and the (pre-rendered) volume, then predicts ``--runs`` times:
median wall time, the process's RSS with model and volume loaded, and its peak RSS during the
predictions (``VmHWM``, reset through ``/proc/self/clear_refs`` after loading); and the peak a
job records for the same predictions (``inference.gpu.PeakMemory``, "run peak": on CUDA the bytes
PyTorch allocated on the device, on the CPU the growth of the resident set over the run).

The overhead pair runs the same weights twice: as the bundle (MONAI's Orientationd, Spacingd
to 4 x 4 x 5 mm, ScaleIntensityRanged, SlidingWindowInferer 32^3 overlap 0.25 gaussian,
Activationsd, Invertd, AsDiscreted) and as a ``model.pt`` + ``model.toml`` folder run by the
node's own TorchScript path with the same spacing, window, patch, overlap and blending.  The
ratio of their medians is taken in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.demo import ChestSpec, make_chest_phantom
from tests.support.tiny_models import SCALED, WINDOW, make_bundle, make_nnunet

CARD = """
name = "phantom-ts"
version = "0.1.0"
modalities = ["CT"]

[input]
spacing = [5.0, 4.0, 4.0]
normalisation = {{ kind = "window", min = {lo}, max = {hi} }}

[inference]
patch_size = [32, 32, 32]
overlap = 0.25
blend = "gaussian"

[output]
activation = "softmax"
threshold = 0.5

[[labels]]
name = "lung"
channel = 1
category = {{ value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}
type = {{ value = "39607008", scheme = "SCT", meaning = "Lung" }}

[[labels]]
name = "bone"
channel = 2
category = {{ value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}
type = {{ value = "272673000", scheme = "SCT", meaning = "Bone" }}
"""


class _Rescale(torch.nn.Module):
    """The card's window gives [0, 1]; the bundle's network was trained on SCALED."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.scale = float(SCALED[1] - SCALED[0])
        self.offset = float(SCALED[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x * self.scale + self.offset)
        return out


def torchscript_folder(bundle: Path, out: Path) -> Path:
    """The bundle's network (same weights) as a TorchScript card model."""
    from tests.support.tiny_models import bundle_network

    net = bundle_network()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(_Rescale(net)), str(out / "model.pt"))
    (out / "model.toml").write_text(CARD.format(lo=WINDOW[0], hi=WINDOW[1]))
    return out


def _child(kind: str, folder: str, data: str, runs: int, threads: int, device: str, queue: Any) -> None:
    torch.set_num_threads(threads)
    from inference import Volume
    from inference.gpu import PeakMemory, resolve_device

    cpu = resolve_device(device)  # the device every model of this run uses
    model: Any
    if kind == "builtin":
        from inference.registry import ModelRegistry

        model = ModelRegistry(cpu).get(folder)
    elif kind == "bundle":
        from inference.bundle import MonaiBundleModel

        model = MonaiBundleModel(Path(folder), cpu, name="phantom-bundle")
    elif kind == "bundle-ts":
        from inference.bundle import MonaiBundleModel

        model = MonaiBundleModel(Path(folder), cpu, name="phantom-bundle", weights="model.ts")
    elif kind == "torchscript":
        from inference.user_models import load_user_model

        model = load_user_model(Path(folder), cpu)
    else:
        from inference.nnunet import NnUNetModel

        model = NnUNetModel(Path(folder), cpu, name="phantom-nnunet", mirroring=kind == "nnunet-mirroring")
    # The phantom was rendered (2x2x2 supersampled, a big peak) by the parent: only loaded here.
    arrays = np.load(data)
    volume = Volume(arrays["hu"], arrays["affine"], "CT")
    truths = {"lung": arrays["lungs"], "bone": arrays["bone"]}
    loaded = _rss_mib("VmRSS")
    # ru_maxrss survives exec (a spawned child starts with its parent's peak): reset this
    # process's high-water mark instead and read VmHWM after the predictions.
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    dice = {}
    with PeakMemory.measure(cpu) as run_peak:  # what a job records (resets VmHWM again: same point)
        for _ in range(runs):
            t0 = time.perf_counter()
            prediction = model.predict(volume)
            times.append(time.perf_counter() - t0)
    for seg in prediction.segments:
        truth = truths.get({"lungs": "lung"}.get(seg.label.name, seg.label.name))
        if truth is not None:
            dice[seg.label.name] = float(2 * (seg.mask & truth).sum() / (seg.mask.sum() + truth.sum()))
    queue.put({"times": times, "peak_mib": _rss_mib("VmHWM"), "loaded_mib": loaded, "dice": dice,
               "run_peak_mib": run_peak.peak_bytes / 2**20, "run_peak_kind": run_peak.kind, "device": str(cpu)})


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(kind: str, folder: str, data: Path, runs: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, folder, str(data), runs, threads, device, queue))
    proc.start()
    result: dict[str, Any] = queue.get(timeout=3600)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="predictions per model (median reported)")
    parser.add_argument("--size", type=int, default=192, help="rows and columns of the benchmark phantom")
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help='"cpu" (default), "auto" (CUDA when present), "cuda:N"')
    args = parser.parse_args()
    # The benchmark phantom: the test phantom's anatomy at a finer grid.
    spec = ChestSpec(rows=args.size, columns=args.size, slices=args.slices,
                     pixel_spacing=96 * 3.5 / args.size, slice_spacing=48 * 5.0 / args.slices)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        train_phantom = make_chest_phantom(ChestSpec())
        bundle = make_bundle(root / "bundle", train_phantom)
        nnunet = make_nnunet(root / "Dataset999_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres", train_phantom)
        ts = torchscript_folder(bundle, root / "ts")
        phantom = make_chest_phantom(spec)
        data = root / "phantom.npz"
        np.savez(data, hu=phantom.hu, affine=phantom.affine, lungs=phantom.masks["lungs"], bone=phantom.masks["bone"])
        del phantom
        print(f"trained the tiny networks in {time.perf_counter() - t0:.0f} s")
        print(f"phantom {args.slices} x {args.size} x {args.size} = {args.slices * args.size**2 / 1e6:.1f} Mvoxels,"
              f" {args.runs} runs, {args.threads} threads, device {args.device}")
        cases = [
            ("ct-tissue (built-in)", "builtin", "ct-tissue"),
            ("TorchScript card, same network", "torchscript", str(ts)),
            ("MONAI bundle, model.pt", "bundle", str(bundle)),
            ("MONAI bundle, model.ts", "bundle-ts", str(bundle)),
            ("nnU-Net, no mirroring", "nnunet", str(nnunet)),
            ("nnU-Net, mirroring (8 passes)", "nnunet-mirroring", str(nnunet)),
        ]
        results = {}
        print(f"{'model':34} {'median s':>9} {'min s':>7} {'max s':>7} {'loaded MiB':>11} {'peak MiB':>9}"
              f" {'run peak MiB':>13}  Dice")
        for title, kind, folder in cases:
            r = measure(kind, folder, data, args.runs, args.threads, args.device)
            results[kind] = r
            dice = " ".join(f"{k} {v:.3f}" for k, v in sorted(r["dice"].items()))
            run_peak = f"{r['run_peak_mib']:.0f} {'GPU' if r['run_peak_kind'] == 'cuda_allocated' else 'RSS'}"
            print(f"{title:34} {statistics.median(r['times']):9.2f} {min(r['times']):7.2f} {max(r['times']):7.2f}"
                  f" {r['loaded_mib']:11.0f} {r['peak_mib']:9.0f} {run_peak:>13}  {dice}")
        ratio = statistics.median(results["bundle"]["times"]) / statistics.median(results["torchscript"]["times"])
        ratio_ts = statistics.median(results["bundle-ts"]["times"]) / statistics.median(results["torchscript"]["times"])
        print(f"bundle overhead: bundle(model.pt) / TorchScript card = {ratio:.2f}x;"
              f" bundle(model.ts) / TorchScript card = {ratio_ts:.2f}x (medians, same run)")


if __name__ == "__main__":
    main()
