"""Latency: last instance received -> results delivered, per stage, embedded broker and Redis.

Run by hand: ``python -m benchmarks.latency [--series 5] [--model ct-tissue] [--brokers embedded redis]``.

A real ``dicom-node serve`` (``tests.support.node.start_node``) receives small chest
phantoms from DCMTK ``storescu`` and sends its SEG + SR to a DCMTK ``storescp`` archive.  The
phantom sets ImagesInAcquisition, so the series is complete as soon as its association is
released (the idle timeout is set to 60 s here: a series completed by it would show).  The
catalog holds every timestamp: ``instances.received_at`` (last one), ``series.completed_at``,
``jobs.queued_at/running_at/encoded_at/done_at`` (``done`` = every destination took the
files).  The model's own time (``results.timings.inference_s``, wall time of ``predict``) is
subtracted for the target: results <= 2 s after the last instance, plus model time.
One warm-up series per broker is not counted (the worker imports torch and builds the model).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def storescu(port: int, files: Sequence[Path]) -> None:
    """Send ``files`` in one association with an unmodified storescu."""
    res = subprocess.run(
        ["storescu", "-aet", "CT1", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port), *map(str, files)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stdout}{res.stderr}")


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


def run_broker(broker: str, workdir: Path, corpora: list[tuple[str, list[Path]]], model: str) -> list[SeriesTiming]:
    """Start archive (+ Redis), node (+ worker); send each corpus; return the timings."""
    archive = procs.start_storescp(workdir / "archive")
    redis = procs.start_redis(workdir / "redis") if broker == "redis" else None
    extra: dict[str, Any] = {"worker": {"in_process": "no"}} if redis else {}
    config = node_config(
        workdir / "node",
        broker_url=redis.extra["url"] if redis else None,
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}],
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": [model], "destinations": ["archive"]}],
        idle_seconds=60.0,
        **extra,
    )
    node: NodeProcess | None = None
    try:
        node = start_node(workdir / "node", config)
        if redis:
            node.start_worker("w1")
        catalog = Catalog(f"sqlite:///{workdir / 'node' / 'node.db'}", create=False)
        out = []
        for i, (uid, files) in enumerate(corpora):
            storescu(node.port, files)
            timing = wait_until(functools.partial(series_timing, catalog, uid), 300, interval=0.05,
                                what=f"results of series {i}")
            if i > 0:  # the first one warms the worker up
                out.append(timing)
        catalog.close()
        return out
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


def print_report(broker: str, timings: list[SeriesTiming]) -> None:
    """Per-stage medians (ms), end-to-end and end-to-end minus model time."""
    print(f"\n{broker} broker: {len(timings)} series (completion: "
          f"{', '.join(sorted({t.reason for t in timings}))})")
    print(f"{'stage':<26} {'median ms':>10} {'runs (ms)'}")

    def row(name: str, values: list[float]) -> None:
        runs = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"{name:<26} {statistics.median(values) * 1000:>10.0f} {runs}")

    for name, start, end in STAGES:
        row(name, [getattr(t, end) - getattr(t, start) for t in timings])
    row("  of which load", [t.timings.get("load_s", 0.0) for t in timings])
    row("  of which model", [t.model_seconds for t in timings])
    row("  of which encode", [t.timings.get("encode_s", 0.0) for t in timings])
    row("end to end", [t.end_to_end for t in timings])
    row("end to end - model", [t.end_to_end - t.model_seconds for t in timings])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=5, help="measured series per broker")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--model", default="ct-tissue")
    parser.add_argument("--brokers", nargs="+", default=["embedded", "redis"], choices=["embedded", "redis"])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dn-latency-") as tmp:
        scratch = Path(tmp)
        phantom = make_chest_phantom(ChestSpec(slices=args.slices))
        results: dict[str, list[SeriesTiming]] = {}
        for broker in args.brokers:
            corpora = []
            for i in range(args.series + 1):
                info = SeriesInfo(seed=f"latency-{broker}-{i}-{time.time_ns()}")
                files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info),
                                       scratch / f"corpus-{broker}-{i}")
                corpora.append((info.uid("series"), files))
            results[broker] = run_broker(broker, scratch / broker, corpora, args.model)
        print(f"\nLatency, {args.slices}-slice {ChestSpec().rows}x{ChestSpec().columns} CT phantom, "
              f"model {args.model}, medians of {args.series} series")
        for broker, timings in results.items():
            print_report(broker, timings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
