"""Latency: last instance received -> results delivered, per stage, p50 and p95.

Run by hand: ``python -m benchmarks.latency [--rounds 6 3] [--slices 30 300] [--concurrency 1 4]
[--brokers embedded redis] [--model ct-tissue]``.

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


class Corpus:
    """Writes phantom series on demand (new UIDs each time), with or without ImagesInAcquisition."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._phantoms: dict[int, Any] = {}
        self._n = 0

    def series(self, slices: int, counted: bool) -> tuple[str, list[Path]]:
        if slices not in self._phantoms:
            self._phantoms[slices] = make_chest_phantom(ChestSpec(slices=slices))
        phantom = self._phantoms[slices]
        self._n += 1
        info = SeriesInfo(seed=f"latency-{self._n}-{time.time_ns()}")
        datasets = slice_datasets(phantom.hu, phantom.affine, info)
        if not counted:
            for ds in datasets:
                del ds.ImagesInAcquisition
        return info.uid("series"), write_datasets(datasets, self.scratch / f"series-{self._n}")


def run_broker(broker: str, workdir: Path, cases: Sequence[Case], model: str,
               learn_series: int) -> dict[Case, list[SeriesTiming]]:
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
    corpus = Corpus(workdir / "corpus")
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
            print_report(broker, case, timings)  # as it comes: a long run stopped early keeps them
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


def stage_values(timings: Sequence[SeriesTiming]) -> list[tuple[str, list[float]]]:
    """Seconds per stage (and end to end) for each series."""
    rows = [(name, [getattr(t, end) - getattr(t, start) for t in timings]) for name, start, end in STAGES]
    rows += [
        ("  of which load", [t.timings.get("load_s", 0.0) for t in timings]),
        ("  of which model", [t.model_seconds for t in timings]),
        ("  of which encode", [t.timings.get("encode_s", 0.0) for t in timings]),
        ("end to end", [t.end_to_end for t in timings]),
        ("end to end - model", [t.end_to_end - t.model_seconds for t in timings]),
    ]
    return rows


def print_report(broker: str, case: Case, timings: list[SeriesTiming]) -> None:
    """p50 / p95 per stage (ms), as a Markdown table."""
    reasons = ", ".join(sorted({t.reason for t in timings}))
    print(f"\n{broker} broker, {case.label}: {len(timings)} series (completed by: {reasons})\n")
    print("| stage | p50 ms | p95 ms |\n|---|---|---|")
    for name, values in stage_values(timings):
        p50, p95 = np.percentile(values, [50, 95])
        print(f"| {name} | {p50 * 1000:.0f} | {p95 * 1000:.0f} |")
    print("", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--rounds", type=int, nargs="+", default=[6, 3],
                        help="rounds per series size (one value per --slices entry)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--model", default="ct-tissue")
    parser.add_argument("--learn-series", type=int, default=5, help="completion.learn_min_series")
    parser.add_argument("--brokers", nargs="+", default=["embedded", "redis"], choices=["embedded", "redis"])
    args = parser.parse_args(argv)
    if len(args.rounds) != len(args.slices):
        parser.error("give one --rounds value per --slices value")
    cases = [Case(slices, counted, conc, rounds)
             for slices, rounds in zip(args.slices, args.rounds, strict=True)
             for counted in (True, False) for conc in args.concurrency]
    with tempfile.TemporaryDirectory(prefix="dn-latency-") as tmp:
        scratch = Path(tmp)
        results = {broker: run_broker(broker, scratch / broker, cases, args.model, args.learn_series)
                   for broker in args.brokers}
        spec = ChestSpec()
        print(f"\nLatency, {spec.rows}x{spec.columns} CT phantoms, model {args.model}, "
              f"idle_seconds 15, learned sender: end to end p50 / p95 s")
        for broker, per_case in results.items():
            for case, timings in per_case.items():
                p50, p95 = np.percentile([t.end_to_end for t in timings], [50, 95])
                m50, m95 = np.percentile([t.end_to_end - t.model_seconds for t in timings], [50, 95])
                print(f"| {broker} | {case.label} | {len(timings)} | {p50:.2f} / {p95:.2f} "
                      f"| {m50:.2f} / {m95:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
