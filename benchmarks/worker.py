"""Benchmark a worker's throughput with and without prefetch, and its peak memory per job.

``python -m benchmarks.worker [--series 6] [--slices 300] [--size 512] [--runs 3]`` spools a
seeded corpus of CT series (chest phantoms scaled up), records them in a SQLite catalog as the
listener does and queues one ``ct-tissue`` job per series.  Each run then takes every job in
the broker's order through ``workers.pipeline`` (load → predict → encode SEG + SR → deliver to a
DCMTK ``storescp`` archive when installed), as a worker process does, once with
``[worker] prefetch`` off and once on (alternating, in the same run), and prints per stage the
median seconds per job, the wall time of all jobs (median of the runs) and the ratio.

``python -m benchmarks.worker --peak-rss [--slices 1000]`` runs ONE job on a ``--slices`` x
512 x 512 CT through ``workers.pipeline.run_inference`` in a fresh child process and reports its
peak resident memory (``VmHWM``; ``ru_maxrss`` of the child as a check), with the resident
memory at the end of and the peak during each stage (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.catalog import Catalog, JobSpec, JobState
from dicom_node.catalog.recorder import instance_from_file
from dicom_node.demo import ChestSpec, axial_affine, make_chest_phantom, write_datasets
from dicom_node.ingest.events import StoredInstance
from dicom_node.logs import configure_logging
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import (
    DatabaseSettings,
    DestinationSettings,
    Settings,
    StorageSettings,
    WorkerSettings,
)
from inference.models.ct_tissue import BODY_LABEL
from inference.prediction import ML, VOLUME, Label, Measurement, Prediction, Segment
from inference.volume import Volume
from tests.support import procs, quirks
from tests.support.queues import MemoryQueue

MODEL = "ct-tissue"
STAGES = ("load_wait", "load", "predict", "encode", "deliver")
GIB = 1024**3


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- corpus --------------------------------------------------------------------------------


def write_ct_series(folder: Path, seed: int, slices: int, size: int) -> list[Path]:
    """A ``slices`` x ``size`` x ``size`` CT (a 128-pixel chest phantom scaled up), written in chunks."""
    existing = sorted(folder.glob("*.dcm"))
    if len(existing) == slices:
        return existing
    shutil.rmtree(folder, ignore_errors=True)
    factor = max(1, size // 128)
    small = make_chest_phantom(ChestSpec(rows=size // factor, columns=size // factor, slices=64,
                                         pixel_spacing=0.7 * factor, slice_spacing=slices / 64.0,
                                         seed=seed))
    affine = axial_affine((slices, size, size), 0.7, 1.0)
    base = quirks.series_info(f"bench-worker-{seed}")
    paths: list[Path] = []
    for start in range(0, slices, 50):
        n = min(50, slices - start)
        part = affine.copy()
        part[:3, 3] = affine[:3, 3] + start * affine[:3, 0]
        # Each slice of the small phantom stands for slices/64 slices of this one.
        block = small.hu[[(start + k) * 64 // slices for k in range(n)]]
        block = np.repeat(np.repeat(block, factor, axis=1), factor, axis=2)
        info = quirks.series_info(f"bench-worker-{seed}-{start}", study_uid=base.study_uid,
                                  series_uid=base.series_uid, frame_of_reference_uid=base.frame_of_reference_uid)
        datasets = quirks.stack(block, part, info)
        for k, ds in enumerate(datasets):
            ds.InstanceNumber = start + k + 1
        paths.extend(write_datasets(datasets, folder))
    return paths


def spool_corpus(workdir: Path, count: int, slices: int, size: int) -> list[list[StoredInstance]]:
    """Write ``count`` series into the spool; return their instances as the listener reports them."""
    return [
        [instance_from_file(p, calling_ae_title="CT1")
         for p in write_ct_series(workdir / "spool" / f"series-{seed}", seed, slices, size)]
        for seed in range(count)
    ]


def fresh_catalog(path: Path, corpus: list[list[StoredInstance]], model: str = MODEL) -> tuple[Catalog, list[int]]:
    """A new catalog at ``path`` with every series recorded, complete, and one queued job each."""
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    catalog = Catalog(f"sqlite:///{path}")
    queue = MemoryQueue()
    jobs = []
    for instances in corpus:
        catalog.record_instances(instances)
        uid = instances[0].series_instance_uid
        catalog.mark_series_complete(uid, "idle")
        (job_id,) = catalog.create_jobs([JobSpec(uid, "bench", model, ["archive"])])
        queue_job(catalog, queue, job_id)
        jobs.append(job_id)
    return catalog, jobs


def node_settings(workdir: Path, archive: procs.Server | None, prefetch: bool,
                  catalog: str = "catalog.db") -> Settings:
    destinations = []
    if archive is not None:
        destinations.append(DestinationSettings(name="archive", ae_title="ARCHIVE", host=procs.LOOPBACK,
                                                port=archive.port))
    return Settings(storage=StorageSettings(root=workdir / "spool"),
                    database=DatabaseSettings(url=f"sqlite:///{workdir / catalog}"),
                    worker=WorkerSettings(device="cpu", prefetch=prefetch),
                    destinations=destinations)


# --- memory --------------------------------------------------------------------------------


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Restart ``VmHWM`` from the current RSS (Linux >= 4.0); False where that is not possible.

    The pipeline's per-job peak (``inference.gpu.PeakMemory``) would reset it too, before each
    prediction, and the whole job's peak read here would lose the load stage: it is turned off
    (the jobs then record ``rss_lifetime``).
    """
    from inference.gpu import PeakMemory

    PeakMemory.reset_rss = False
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples this process's resident memory every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.005) -> None:
        self.samples: list[tuple[float, int]] = []
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _status("VmRSS")))
            self._stop.wait(self._period)

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def at(self, t: float) -> int:
        before = [rss for ts, rss in self.samples if ts <= t]
        return before[-1] if before else 0


# --- throughput ----------------------------------------------------------------------------


class AcceleratorStandIn:
    """Stands in for a model on a GPU (``--stand-in SECONDS``): the host thread waits while the
    device works, using no CPU, then the body is the voxels above -500 HU."""

    name = "accelerator-stand-in"
    version = "1.0.0"
    modalities = frozenset({"CT"})

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.labels: tuple[Label, ...] = (BODY_LABEL,)

    def predict(self, volume: Volume) -> Prediction:
        time.sleep(self.seconds)
        mask = volume.array > -500.0
        ml = float(mask.sum()) * volume.voxel_volume_ml
        return Prediction(self.name, self.version, [Segment(self.labels[0], mask, [Measurement(VOLUME, ml, ML)])])


def run_jobs(ctx: Any, catalog: Catalog, job_ids: list[int], model: str) -> dict[str, Any]:
    """Take every queued job in the broker's order through the pipeline, as a worker does."""
    from workers.pipeline import deliver, run_inference
    from workers.prefetch import next_queued_job

    stages: list[dict[str, float]] = []
    background: list[float] = []
    reset_peak_rss()
    t0 = time.perf_counter()
    while (job := next_queued_job(catalog, [model])) is not None:
        job = catalog.transition(job.id, JobState.RUNNING, expect=(JobState.QUEUED,), count_attempt=True)
        results = run_inference(ctx, job)
        catalog.set_results(job.id, results)
        catalog.transition(job.id, JobState.ENCODED)
        job = catalog.transition(job.id, JobState.DELIVERING)
        pending = deliver(ctx, job)
        if pending:
            raise RuntimeError(f"delivery failed: {pending}")
        catalog.transition(job.id, JobState.DONE)
        stages.append(dict(ctx.timings))
        if results["timings"].get("prefetched"):
            background.append(float(results["timings"]["prefetch_load_s"]))
    wall = time.perf_counter() - t0
    if len(stages) != len(job_ids):
        raise RuntimeError(f"ran {len(stages)} of {len(job_ids)} jobs")
    return {"wall": wall, "stages": stages, "background": background, "peak_rss": _status("VmHWM")}


def throughput(args: argparse.Namespace) -> int:
    import torch

    from inference.registry import ModelRegistry
    from workers.pipeline import WorkerContext
    from workers.prefetch import Prefetcher

    workdir: Path = args.workdir
    shutil.rmtree(workdir / "outbox", ignore_errors=True)
    t0 = time.perf_counter()
    corpus = spool_corpus(workdir, args.series, args.slices, args.size)
    print(f"{args.series} series of {args.slices} x {args.size}x{args.size} CT spooled in "
          f"{time.perf_counter() - t0:.1f} s; load average {loadavg()}")
    archive = procs.start_storescp(workdir / "archive") if procs.tool_path("storescp") else None
    print("delivery: " + (f"C-STORE to storescp on port {archive.port}" if archive else
                          "none (storescp not installed)"))
    registry = ModelRegistry(torch.device("cpu"))
    model = MODEL
    if args.stand_in is not None:
        model = AcceleratorStandIn.name
        registry.register(model, lambda _device: AcceleratorStandIn(args.stand_in))
    print(f"model {model}" + (f" (waits {args.stand_in:g} s per job)" if args.stand_in is not None else ""))
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")

    def one_run(name: str, prefetch: bool, series: list[list[StoredInstance]]) -> dict[str, Any]:
        if archive is not None:
            shutil.rmtree(archive.extra["received"], ignore_errors=True)
            Path(archive.extra["received"]).mkdir()
        catalog, job_ids = fresh_catalog(workdir / f"catalog-{name}.db", series, model)
        settings = node_settings(workdir, archive, prefetch, f"catalog-{name}.db")
        ctx = WorkerContext(settings, catalog, registry,
                            prefetcher=Prefetcher(catalog, [model]) if prefetch else None)
        try:
            return run_jobs(ctx, catalog, job_ids, model)
        finally:
            if ctx.prefetcher is not None:
                ctx.prefetcher.close()
            catalog.close()

    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        # Warm-up (not counted): first use of the model, the encoders and the page cache.
        one_run("warm-up", False, corpus[:1])
        for r in range(args.runs):
            for mode in ("off", "on"):
                out = one_run(f"{r}-{mode}", mode == "on", corpus)
                runs[mode].append(out)
                print(f"  run {r + 1} prefetch {mode:<3}: {out['wall']:6.1f} s, peak RSS "
                      f"{out['peak_rss'] / GIB:.2f} GiB; load average {loadavg()}", flush=True)
    finally:
        if archive is not None:
            archive.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_throughput(args, runs)
    return 0


def print_throughput(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n{args.series} jobs per run, {args.runs} runs; per job: median seconds over "
          f"{args.series * args.runs} jobs (jobs 2..{args.series} of a run take a prefetched volume)")
    print(f"{'stage':<28}{'prefetch off':>14}{'prefetch on':>14}")
    for stage in STAGES:
        cells = [statistics.median(s.get(stage, 0.0) for run in runs[m] for s in run["stages"]) for m in ("off", "on")]
        print(f"{stage:<28}{cells[0]:>14.3f}{cells[1]:>14.3f}")
    background = [b for run in runs["on"] for b in run["background"]]
    if background:
        print(f"{'load in the background':<28}{'':>14}{statistics.median(background):>14.3f}")
    walls = {m: statistics.median(run["wall"] for run in runs[m]) for m in ("off", "on")}
    each = {m: ", ".join(f"{run['wall']:.1f}" for run in runs[m]) for m in ("off", "on")}
    print(f"{'wall, all jobs (median)':<28}{walls['off']:>14.1f}{walls['on']:>14.1f}")
    print(f"  runs off: {each['off']}; on: {each['on']}")
    peak = {m: max(run["peak_rss"] for run in runs[m]) / GIB for m in ("off", "on")}
    print(f"{'peak RSS of the process':<28}{peak['off']:>13.2f}G{peak['on']:>13.2f}G")
    print(f"ratio wall off / on: {walls['off'] / walls['on']:.3f}  "
          f"({args.series * 3600 / walls['off']:.0f} vs {args.series * 3600 / walls['on']:.0f} jobs/hour)")
    print(f"load average {loadavg()}")


# --- peak memory of one job ----------------------------------------------------------------


def peak_child(workdir: Path) -> dict[str, Any]:
    """Run the one queued job of ``workdir``'s catalog through ``run_inference``, measuring memory."""
    from workers.pipeline import build_context, run_inference

    settings = node_settings(workdir, None, prefetch=True)
    ctx = build_context(settings)
    ctx.registry.get(MODEL)  # the model is loaded before the job, as in a warm worker
    (job,) = ctx.catalog.list_jobs(state=JobState.QUEUED.value)
    job = ctx.catalog.transition(job.id, JobState.RUNNING, count_attempt=True)
    reset_peak_rss()
    start_rss = _status("VmRSS")
    sampler = RssSampler()
    with sampler.running():
        t0 = time.perf_counter()
        results = run_inference(ctx, job)
        t3 = time.perf_counter()
    timings = results["timings"]
    t1 = t0 + float(timings["load_s"])
    t2 = t1 + float(timings["inference_s"])
    return {
        "start_rss": start_rss,
        "stages": {
            "load": {"seconds": t1 - t0, "end_rss": sampler.at(t1), "peak_rss": sampler.peak(t0, t1)},
            "predict": {"seconds": t2 - t1, "end_rss": sampler.at(t2), "peak_rss": sampler.peak(t1, t2)},
            "encode": {"seconds": t3 - t2, "end_rss": sampler.at(t3), "peak_rss": sampler.peak(t2, t3)},
        },
        "vm_hwm": _status("VmHWM"),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "segments": results["segments"],
        "files_bytes": sum(Path(f).stat().st_size for f in results["files"]),
    }


def peak_rss(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir
    t0 = time.perf_counter()
    catalog, _ = fresh_catalog(workdir / "catalog.db", spool_corpus(workdir, 1, args.slices, args.size))
    catalog.close()
    size = sum(p.stat().st_size for p in (workdir / "spool").rglob("*.dcm"))
    print(f"one {args.slices} x {args.size}x{args.size} CT ({size / 2**20:.0f} MiB of files) ready in "
          f"{time.perf_counter() - t0:.1f} s; load average {loadavg()}")
    try:
        cmd = [sys.executable, "-m", "benchmarks.worker", "--peak-rss-child", "--workdir", str(workdir)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"model {MODEL} on the CPU, {result['segments']} segments, SEG + SR "
          f"{result['files_bytes'] / 2**20:.1f} MiB; RSS before the job {result['start_rss'] / GIB:.2f} GiB")
    print(f"{'stage':<10}{'seconds':>9}{'RSS at end':>13}{'peak during':>13}")
    for name, stage in result["stages"].items():
        print(f"{name:<10}{stage['seconds']:>9.1f}{stage['end_rss'] / GIB:>12.2f}G{stage['peak_rss'] / GIB:>12.2f}G")
    print(f"peak RSS of the job: {result['vm_hwm'] / GIB:.2f} GiB (VmHWM); "
          f"ru_maxrss of the child {children / GIB:.2f} GiB; load average {loadavg()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the throughput comparison, or the peak-memory run with ``--peak-rss``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--slices", type=int, default=None, help="300 (throughput), 1000 (--peak-rss)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench/worker"))
    parser.add_argument("--keep", action="store_true", help="keep the written series")
    parser.add_argument("--stand-in", type=float, default=None, metavar="SECONDS",
                        help=f"instead of {MODEL}, a stand-in for a GPU model that waits SECONDS per job")
    parser.add_argument("--peak-rss", action="store_true", help="peak memory of one job instead")
    parser.add_argument("--peak-rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    configure_logging("console", "WARNING")  # the per-job log lines would drown the figures
    if args.peak_rss_child:
        print(json.dumps(peak_child(args.workdir)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.peak_rss:
        args.slices = args.slices or 1000
        return peak_rss(args)
    args.slices = args.slices or 300
    return throughput(args)


if __name__ == "__main__":
    sys.exit(main())
