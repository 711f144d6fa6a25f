"""Scaling: jobs/hour with 1, 2 and 4 worker processes on Redis, and the overhead per job.

Run by hand: ``python -m benchmarks.scaling [--workers 1 2 4] [--jobs 16] [--model ct-tissue]``.

For each worker count: a real ``dicom-node serve`` (no in-process worker), a real
``redis-server`` broker, N separate ``dicom-node worker`` processes (concurrency 1 each, torch
threads = cores / N) and a DCMTK ``storescp`` archive.  N warm-up series (one per worker; not counted) are sent and
finished first.  Throughput: ``--jobs`` small chest phantoms sent (one association
each, four senders at once); jobs/hour = jobs / (first ``queued_at`` -> last ``done_at``).

Overhead per job, measured in a separate pass with one series in flight at a time (so no job
waits for a busy worker): the broker hop (``queued -> running``) plus the bookkeeping inside
``running`` (``running -> encoded`` minus the load, model and encode times the worker
measured).  The dispatch hop (``encoded -> delivering``) is shown too.  Target: <= 50 ms.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select

from benchmarks.latency import storescu
from dicom_node.catalog import Catalog, JobRow
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until


def _jobs(catalog: Catalog, series: Sequence[str]) -> list[JobRow] | None:
    """The jobs of ``series`` once all are finished (None before); raises on a failed job."""
    with catalog.session() as s:
        jobs = list(s.scalars(select(JobRow).where(JobRow.series_instance_uid.in_(list(series)))))
    if len(jobs) < len(series) or any(j.state not in ("done", "failed") for j in jobs):
        return None
    failed = [j for j in jobs if j.state == "failed"]
    if failed:
        raise RuntimeError(f"job {failed[0].id} failed: {failed[0].reason}")
    return jobs


def _corpus(scratch: Path, tag: str, n: int, phantom: object) -> list[tuple[str, list[Path]]]:
    out = []
    for i in range(n):
        info = SeriesInfo(seed=f"scaling-{tag}-{i}-{time.time_ns()}")
        files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info),  # type: ignore[attr-defined]
                               scratch / f"corpus-{tag}-{i}")
        out.append((info.uid("series"), files))
    return out


def run(workers: int, jobs: int, overhead_jobs: int, model: str, scratch: Path,
        phantom: object, show_jobs: bool = False) -> dict[str, float | list[float]]:
    """One worker count: throughput, then (optionally) the sequential overhead pass."""
    work = scratch / f"w{workers}"
    archive = procs.start_storescp(work / "archive")
    redis = procs.start_redis(work / "redis")
    config = node_config(
        work / "node", broker_url=redis.extra["url"],
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}],
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": [model], "destinations": ["archive"]}],
        idle_seconds=60.0, worker={"in_process": "no"},
    )
    node = start_node(work / "node", config)
    try:
        # Each torch uses every core by default: N workers would oversubscribe the machine.
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for i in range(workers):
            node.start_worker(f"w{i + 1}", extra_env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        catalog = Catalog(f"sqlite:///{work / 'node' / 'node.db'}", create=False)
        warm = _corpus(scratch, f"{workers}-warm", workers, phantom)
        for _uid, files in warm:
            storescu(node.port, files)
        wait_until(lambda: _jobs(catalog, [u for u, _ in warm]), 600, what="warm-up jobs")

        batch = _corpus(scratch, f"{workers}-batch", jobs, phantom)
        sent_start = time.time()
        # Four senders at once, so the batch is queued faster than the workers take it.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda item: storescu(node.port, item[1]), batch))
        sent_seconds = time.time() - sent_start
        done = wait_until(lambda: _jobs(catalog, [u for u, _ in batch]), 1200, what="batch jobs")
        span = max(j.done_at or 0.0 for j in done) - min(j.queued_at or 0.0 for j in done)
        if show_jobs:
            t0 = min(j.queued_at or 0.0 for j in done)
            print(f"\n{workers} worker(s): job, then seconds since the first queued: "
                  "queued running encoded delivering done (load/model/encode s)")
            for j in sorted(done, key=lambda j: j.running_at or 0.0):
                stamps = (j.queued_at, j.running_at, j.encoded_at, j.delivering_at, j.done_at)
                print(f"  {j.id:>4} " + " ".join(f"{(v or t0) - t0:7.2f}" for v in stamps),
                      j.results.get("timings"))
        result: dict[str, float | list[float]] = {
            "jobs_per_hour": len(done) / span * 3600, "span_s": span, "send_s": sent_seconds,
            "job_s": statistics.median((j.done_at or 0.0) - (j.running_at or 0.0) for j in done),
        }
        hop, inside, dispatch = [], [], []
        for uid, files in _corpus(scratch, f"{workers}-seq", overhead_jobs, phantom):
            storescu(node.port, files)
            (job,) = wait_until(functools.partial(_jobs, catalog, [uid]), 600, interval=0.05, what="sequential job")
            t = job.results.get("timings", {})
            assert job.queued_at and job.running_at and job.encoded_at and job.delivering_at
            hop.append(job.running_at - job.queued_at)
            inside.append(job.encoded_at - job.running_at - sum(float(v) for v in t.values()))
            dispatch.append(job.delivering_at - job.encoded_at)
        if hop:
            result.update(hop_s=hop, inside_s=inside, dispatch_s=dispatch)
        catalog.close()
        return result
    except Exception:
        print(node.logs()[-4000:])
        raise
    finally:
        node.stop()
        redis.stop()
        archive.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=16, help="jobs in the throughput batch")
    parser.add_argument("--overhead-jobs", type=int, default=5, help="sequential jobs for the overhead")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--model", default="ct-tissue")
    parser.add_argument("--show-jobs", action="store_true", help="print every batch job's timestamps")
    args = parser.parse_args(argv)

    phantom = make_chest_phantom(ChestSpec(slices=args.slices))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dn-scaling-") as tmp:
        for n in args.workers:
            rows.append((n, run(n, args.jobs, args.overhead_jobs if n == args.workers[0] else 0,
                                args.model, Path(tmp), phantom, args.show_jobs)))
    base = float(rows[0][1]["jobs_per_hour"])  # type: ignore[arg-type]
    print(f"\nScaling, Redis broker, model {args.model}, {args.slices}-slice "
          f"{ChestSpec().rows}x{ChestSpec().columns} phantoms, {args.jobs} jobs per batch")
    print(f"{'workers':>7} {'jobs/hour':>10} {'speed-up':>9} {'batch s':>8} {'send s':>7} {'job s (median)':>15}")
    for n, r in rows:
        jph = float(r["jobs_per_hour"])  # type: ignore[arg-type]
        print(f"{n:>7} {jph:>10.0f} {jph / base:>8.2f}x {float(r['span_s']):>8.1f} "  # type: ignore[arg-type]
              f"{float(r['send_s']):>7.1f} {float(r['job_s']):>15.2f}")  # type: ignore[arg-type]
    first = rows[0][1]
    if "hop_s" in first:
        hop, inside, dispatch = (list(first[k]) for k in ("hop_s", "inside_s", "dispatch_s"))  # type: ignore[arg-type]
        total = [a + b for a, b in zip(hop, inside, strict=True)]
        print(f"\nOverhead per job ({len(hop)} sequential jobs, {rows[0][0]} worker), median ms:")
        for name, values in (("broker hop (queued -> running)", hop),
                             ("bookkeeping inside running", inside),
                             ("overhead (target <= 50 ms)", total),
                             ("dispatch hop (encoded -> delivering)", dispatch)):
            runs = ", ".join(f"{v * 1000:.0f}" for v in values)
            print(f"  {name:<38} {statistics.median(values) * 1000:>6.0f}   ({runs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
