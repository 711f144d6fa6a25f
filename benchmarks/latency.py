"""Latency: last instance received -> results delivered, per stage, p50 and p95.

Run by hand (the full run the lead measures: docs/performance.md gives the command and its
duration)::

    python -m benchmarks.latency [--run latency throughput] [--slices 30 300 1000]
        [--rounds 6 3 2] [--matrix 512] [--concurrency 1 4] [--brokers embedded redis]
        [--throughput-studies 20] [--throughput-slices 300] [--devices cpu cuda]
        [--model ct-tissue]

A real ``dicom-node serve`` (``tests.support.node.start_node``) receives chest phantoms from
DCMTK ``storescu`` (one association per series, calling AE ``CT1``) and sends its SEG + SR to a
DCMTK ``storescp`` archive.  Each configuration - series size, with or without a count
(ImagesInAcquisition), 1 or N studies sent at once - is measured over several rounds.

``idle_seconds`` is 15 s: a series without a count completes at association release only because
the sender is *learned* (its first ``completion.learn_min_series`` series, sent first and not
counted, all ended with their association); the completion reasons are printed, so a series that
waited for the idle timer shows.  The catalog holds every timestamp: ``instances.received_at``
(last one), ``series.completed_at``, ``jobs.queued_at/running_at/encoded_at/done_at`` (``done``
= every destination took the files); the model's own time (``results.timings.inference_s``) is
subtracted for the target: results <= 2 s after the last instance, plus model time.  With N
studies at once the worker (one process) runs their jobs one after the other: the later ones
wait in the queue, which shows in ``queued -> running``.

The phantoms are ``--matrix`` x ``--matrix`` (512 by default, a real CT's; a 1,000-slice series
is then 500 MB): the chest is rendered once per size on at most 64 slices and its slices
repeated to the series length with a thinner spacing, so a 1,000-slice series is written in
seconds, not rendered for minutes.

``--run throughput`` measures studies per hour per worker: ``--throughput-studies`` counted
series of ``--throughput-slices`` are sent back to back and wait in the queue (the node runs no
worker); then one worker process (concurrency 1) is started on each of ``--devices`` and takes
them one after the other.  Studies per hour = studies / (last results delivered - first job
started), so the worker's start-up is not counted; per stage p50 / p95 come from the job rows.
``cuda`` is skipped, with a message, where torch sees no GPU.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from dicom_node.catalog import Catalog, InstanceRow, JobRow, SeriesRow
from dicom_node.demo import (
    ChestSpec,
    SeriesInfo,
    axial_affine,
    make_chest_phantom,
    slice_datasets,
    write_datasets,
)
from tests.support import procs
from tests.support.node import NodeProcess, node_config, start_node, wait_until

STAGES = (
    ("received -> complete", "last_received", "completed"),
    ("complete -> queued", "completed", "queued"),
    ("queued -> running", "queued", "running"),
    ("running -> encoded", "running", "encoded"),
    ("encoded -> delivered", "encoded", "delivered"),
)


@dataclass
class SeriesTiming:
    """Timestamps (epoch seconds) of one series' way through the node."""

    last_received: float
    completed: float
    queued: float
    running: float
    encoded: float
    delivered: float
    reason: str
    timings: dict[str, float]

    @property
    def end_to_end(self) -> float:
        return self.delivered - self.last_received

    @property
    def model_seconds(self) -> float:
        return float(self.timings.get("inference_s", 0.0))

    @property
    def compute_seconds(self) -> float:
        """The worker's own work, measured by it: load + model + encode."""
        return sum(float(self.timings.get(k, 0.0)) for k in ("load_s", "inference_s", "encode_s"))


def storescu(port: int, files: Sequence[Path]) -> subprocess.Popen[str]:
    """Start sending ``files`` in one association with an unmodified storescu."""
    return subprocess.Popen(
        ["storescu", "-aet", "CT1", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def send_all(port: int, corpora: Sequence[tuple[str, list[Path]]]) -> None:
    """Send each corpus in its own association, all at once; raise if one failed."""
    running = [storescu(port, files) for _, files in corpora]
    for proc in running:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {out}")


def series_timing(catalog: Catalog, series_uid: str) -> SeriesTiming | None:
    """The timestamps of ``series_uid`` once its (only) job is done; None before."""
    with catalog.session() as s:
        job = s.scalars(select(JobRow).where(JobRow.series_instance_uid == series_uid)).first()
        if job is None or job.state not in ("done", "failed"):
            return None
        if job.state == "failed":
            raise RuntimeError(f"job {job.id} failed: {job.reason}")
        series = s.get(SeriesRow, series_uid)
        last = s.scalar(select(func.max(InstanceRow.received_at))
                        .where(InstanceRow.series_instance_uid == series_uid))
        assert series is not None and series.completed_at is not None and last is not None
        assert job.queued_at and job.running_at and job.encoded_at and job.done_at
        return SeriesTiming(
            last_received=float(last), completed=series.completed_at, queued=job.queued_at,
            running=job.running_at, encoded=job.encoded_at, delivered=job.done_at,
            reason=str(series.completion_reason), timings=dict(job.results.get("timings", {})),
        )


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    slices: int
    counted: bool
    concurrency: int
    rounds: int

    @property
    def label(self) -> str:
        return (f"{self.slices} slices, {'with' if self.counted else 'no'} count, "
                f"{self.concurrency} at once")


#: Field of view (mm) and chest length (mm) of every phantom, whatever its matrix and slices.
FOV_MM = 336.0
LENGTH_MM = 240.0
#: At most this many slices are rendered; longer series repeat them (see ``ct_volume``).
RENDERED_SLICES = 64


def ct_volume(slices: int, matrix: int) -> tuple[np.ndarray, np.ndarray]:
    """HU voxels and affine of a ``slices`` x ``matrix`` x ``matrix`` chest CT.

    Rendering is 8 supersampled passes over every voxel: too slow for 1,000 x 512 x 512, so at
    most ``RENDERED_SLICES`` are rendered and each repeated to fill the series, whose slice
    spacing shrinks to keep the chest's length: a valid series of the wanted size.
    """
    rendered = min(slices, RENDERED_SLICES)
    base = _rendered_chest(rendered, matrix)
    hu = base[(np.arange(slices) * rendered) // slices]
    return hu, axial_affine(hu.shape, FOV_MM / matrix, LENGTH_MM / slices)


@functools.lru_cache(maxsize=4)
def _rendered_chest(slices: int, matrix: int) -> np.ndarray:
    """The chest rendered on ``slices`` slices (shared by the 300- and 1,000-slice series)."""
    spec = ChestSpec(slices=slices, rows=matrix, columns=matrix, pixel_spacing=FOV_MM / matrix,
                     slice_spacing=LENGTH_MM / slices)
    return make_chest_phantom(spec).hu


class Corpus:
    """Writes phantom series on demand (new UIDs each time), with or without ImagesInAcquisition."""

    def __init__(self, scratch: Path, matrix: int = 512) -> None:
        self.scratch = scratch
        self.matrix = matrix
        self._volumes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._n = 0

    def series(self, slices: int, counted: bool) -> tuple[str, list[Path]]:
        if slices not in self._volumes:
            self._volumes[slices] = ct_volume(slices, self.matrix)
        hu, affine = self._volumes[slices]
        self._n += 1
        info = SeriesInfo(seed=f"latency-{self._n}-{time.time_ns()}")
        datasets = slice_datasets(hu, affine, info)
        if not counted:
            for ds in datasets:
                del ds.ImagesInAcquisition
        return info.uid("series"), write_datasets(datasets, self.scratch / f"series-{self._n}")


def free_spool(node_dir: Path, series_uids: Sequence[str]) -> None:
    """Delete the measured series from the node's spool (their jobs are done): 20 series of
    1,000 slices would otherwise hold 10 GB until the run ends."""
    for uid in series_uids:
        for folder in (node_dir / "spool").glob(f"*/{uid}"):
            shutil.rmtree(folder, ignore_errors=True)


def run_broker(broker: str, workdir: Path, cases: Sequence[Case], model: str,
               learn_series: int, matrix: int) -> dict[Case, list[SeriesTiming]]:
    """Start archive (+ Redis), node (+ worker); teach it the sender; measure every case."""
    archive = procs.start_storescp(workdir / "archive")
    redis = procs.start_redis(workdir / "redis") if broker == "redis" else None
    extra: dict[str, Any] = {"worker": {"in_process": "no"}} if redis else {}
    config = node_config(
        workdir / "node",
        broker_url=redis.extra["url"] if redis else None,
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}],
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": [model], "destinations": ["archive"]}],
        idle_seconds=15.0,
        **extra,
    )
    config["completion"]["learn_min_series"] = learn_series
    # A delivery the archive did not answer is retried (as in production), not a failed run.
    config["delivery"] = {"max_attempts": 5, "backoff_seconds": 0.5}
    node: NodeProcess | None = None
    corpus = Corpus(workdir / "corpus", matrix)
    try:
        node = start_node(workdir / "node", config)
        if redis:
            node.start_worker("w1")
        catalog = Catalog(f"sqlite:///{workdir / 'node' / 'node.db'}", create=False)

        def measure(batch: list[tuple[str, list[Path]]], timeout: float) -> list[SeriesTiming]:
            send_all(node.port, batch)
            out = [wait_until(functools.partial(series_timing, catalog, uid), timeout, interval=0.05,
                              what=f"results of {uid}") for uid, _ in batch]
            for _, files in batch:
                shutil.rmtree(files[0].parent, ignore_errors=True)
            free_spool(workdir / "node", [uid for uid, _ in batch])
            return out

        # Not counted: the sender's first series (they wait for the idle timer) and a warm-up.
        measure([corpus.series(30, False) for _ in range(learn_series)], 300)
        measure([corpus.series(30, True)], 300)
        results: dict[Case, list[SeriesTiming]] = {}
        for case in cases:
            timings: list[SeriesTiming] = []
            for _ in range(case.rounds):
                batch = [corpus.series(case.slices, case.counted) for _ in range(case.concurrency)]
                timings += measure(batch, 120 + case.slices * case.concurrency)
            results[case] = timings
            print_report(f"{broker} broker", case.label, timings)  # as it comes: a stopped run keeps them
        catalog.close()
        return results
    except Exception:
        if node is not None:
            print(node.logs()[-4000:])
        raise
    finally:
        if node is not None:
            node.stop()
        if redis is not None:
            redis.stop()
        archive.stop()


def cuda_available() -> bool:
    """True when torch sees a CUDA device (torch is a worker dependency of this checkout)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass
class ThroughputResult:
    """One worker taking ``studies`` queued series one after the other."""

    device: str
    studies: int
    slices: int
    seconds: float
    timings: list[SeriesTiming]

    @property
    def studies_per_hour(self) -> float:
        return self.studies * 3600.0 / self.seconds


def run_throughput(workdir: Path, *, studies: int, slices: int, matrix: int, model: str,
                   device: str) -> ThroughputResult:
    """Queue ``studies`` counted series with no worker running, then start one worker (one
    process, ``device``) and time it through them all."""
    archive = procs.start_storescp(workdir / "archive")
    config = node_config(
        workdir / "node",
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}],
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": [model], "destinations": ["archive"]}],
        worker={"in_process": "no", "device": device, "concurrency": 1},
    )
    config["delivery"] = {"max_attempts": 5, "backoff_seconds": 0.5}
    corpus = Corpus(workdir / "corpus", matrix)
    node: NodeProcess | None = None
    try:
        node = start_node(workdir / "node", config)
        catalog = Catalog(f"sqlite:///{workdir / 'node' / 'node.db'}", create=False)
        uids = []
        for _ in range(studies):  # one after the other: the queue fills, nothing runs yet
            uid, files = corpus.series(slices, True)
            send_all(node.port, [(uid, files)])
            shutil.rmtree(files[0].parent, ignore_errors=True)
            uids.append(uid)

        def all_queued() -> bool:
            with catalog.session() as s:
                states = list(s.scalars(select(JobRow.state).where(JobRow.series_instance_uid.in_(uids))))
            return len(states) == studies and all(st == "queued" for st in states)

        wait_until(all_queued, 120, what="every study queued")
        node.start_worker("w1")
        timings = [wait_until(functools.partial(series_timing, catalog, uid), 600 + slices * studies,
                              interval=0.2, what=f"results of {uid}") for uid in uids]
        catalog.close()
        seconds = max(t.delivered for t in timings) - min(t.running for t in timings)
        result = ThroughputResult(device, studies, slices, seconds, timings)
        print_report(f"throughput, one {device} worker",
                     f"{studies} studies of {slices} slices queued: {result.studies_per_hour:.1f} studies/hour "
                     f"({seconds:.1f} s)", timings)
        return result
    except Exception:
        if node is not None:
            print(node.logs()[-4000:])
        raise
    finally:
        if node is not None:
            node.stop()
        archive.stop()


def stage_values(timings: Sequence[SeriesTiming]) -> list[tuple[str, list[float]]]:
    """Seconds per stage (and end to end) for each series."""
    rows = [(name, [getattr(t, end) - getattr(t, start) for t in timings]) for name, start, end in STAGES]
    rows += [
        ("  of which load", [t.timings.get("load_s", 0.0) for t in timings]),
        ("  of which model", [t.model_seconds for t in timings]),
        ("  of which encode", [t.timings.get("encode_s", 0.0) for t in timings]),
        ("end to end", [t.end_to_end for t in timings]),
        ("end to end - model", [t.end_to_end - t.model_seconds for t in timings]),
        ("end to end - (load + model + encode)", [t.end_to_end - t.compute_seconds for t in timings]),
    ]
    return rows


def print_report(title: str, label: str, timings: list[SeriesTiming]) -> None:
    """p50 / p95 per stage (ms), as a Markdown table."""
    reasons = ", ".join(sorted({t.reason for t in timings}))
    print(f"\n{title}, {label}: {len(timings)} series (completed by: {reasons})\n")
    print("| stage | p50 ms | p95 ms |\n|---|---|---|")
    for name, values in stage_values(timings):
        p50, p95 = np.percentile(values, [50, 95])
        print(f"| {name} | {p50 * 1000:.0f} | {p95 * 1000:.0f} |")
    print("", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run", nargs="+", default=["latency", "throughput"], choices=["latency", "throughput"])
    parser.add_argument("--slices", type=int, nargs="+", default=[30, 300, 1000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[6, 3, 2],
                        help="rounds per series size (one value per --slices entry)")
    parser.add_argument("--matrix", type=int, default=512, help="rows and columns of every slice")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--model", default="ct-tissue")
    parser.add_argument("--learn-series", type=int, default=5, help="completion.learn_min_series")
    parser.add_argument("--brokers", nargs="+", default=["embedded", "redis"], choices=["embedded", "redis"])
    parser.add_argument("--throughput-studies", type=int, default=20)
    parser.add_argument("--throughput-slices", type=int, default=300)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if len(args.rounds) != len(args.slices):
        parser.error("give one --rounds value per --slices value")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [Case(slices, counted, conc, rounds)
             for slices, rounds in zip(args.slices, args.rounds, strict=True)
             for counted in (True, False) for conc in args.concurrency]
    latency: dict[str, dict[Case, list[SeriesTiming]]] = {}
    throughput: list[ThroughputResult] = []
    with tempfile.TemporaryDirectory(prefix="dn-latency-") as tmp:
        scratch = Path(tmp)
        if "latency" in args.run:
            for broker in args.brokers:
                latency[broker] = run_broker(broker, scratch / broker, cases, args.model, args.learn_series,
                                             args.matrix)
                shutil.rmtree(scratch / broker, ignore_errors=True)
        if "throughput" in args.run:
            for device in args.devices:
                if device == "cuda" and not cuda_available():
                    print("\nthroughput on cuda skipped: torch sees no CUDA device on this machine", flush=True)
                    continue
                throughput.append(run_throughput(scratch / f"throughput-{device}", studies=args.throughput_studies,
                                                 slices=args.throughput_slices, matrix=args.matrix,
                                                 model=args.model, device=device))
    print_summary(args, latency, throughput)
    return 0


def print_summary(args: argparse.Namespace, latency: dict[str, dict[Case, list[SeriesTiming]]],
                  throughput: Sequence[ThroughputResult]) -> None:
    """The tables of docs/performance.md, as Markdown."""
    if latency:
        print(f"\nLatency, {args.matrix}x{args.matrix} CT phantoms, model {args.model}, idle_seconds 15, "
              "learned sender: seconds p50 / p95\n")
        print("| broker | series | n | end to end | end to end - model | waiting (not load, model, encode) |")
        print("|---|---|---|---|---|---|")
        for broker, per_case in latency.items():
            for case, timings in per_case.items():
                cells = [np.percentile(values, [50, 95]) for values in (
                    [t.end_to_end for t in timings],
                    [t.end_to_end - t.model_seconds for t in timings],
                    [t.end_to_end - t.compute_seconds for t in timings])]
                print(f"| {broker} | {case.label} | {len(timings)} | "
                      + " | ".join(f"{p50:.2f} / {p95:.2f}" for p50, p95 in cells) + " |")
    if throughput:
        print(f"\nThroughput, one worker process, {args.matrix}x{args.matrix} CT, model {args.model}\n")
        print("| device | studies x slices | studies / hour | load p50 / p95 s | model p50 / p95 s "
              "| encode p50 / p95 s | deliver p50 / p95 s |")
        print("|---|---|---|---|---|---|---|")
        for r in throughput:
            cols = [[t.timings.get("load_s", 0.0) for t in r.timings], [t.model_seconds for t in r.timings],
                    [t.timings.get("encode_s", 0.0) for t in r.timings],
                    [t.delivered - t.encoded for t in r.timings]]
            shown = " | ".join("{:.2f} / {:.2f}".format(*np.percentile(c, [50, 95])) for c in cols)
            print(f"| {r.device} | {r.studies} x {r.slices} | {r.studies_per_hour:.1f} | {shown} |")


if __name__ == "__main__":
    raise SystemExit(main())
