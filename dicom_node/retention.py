"""Retention: remove series that are fully processed and older than ``storage.retention_days``.

``dicom-node gc`` runs :func:`collect_garbage` once; ``serve`` runs it every
``storage.gc_interval_seconds`` through :class:`RetentionLoop` (when ``retention_days`` > 0).

A series is removed only when it is complete, nothing arrived for it, and every job of it is
``done`` or ``cancelled``, all for longer than the retention period.  A series with a ``failed``
or unfinished job is kept: an operator may still retry it.  Files go first (spool instances,
then each job's outbox folder), catalog rows last: a crash in between leaves rows pointing at
missing files, which the next run removes, never files without rows (which the next start would
find in the spool and process again).
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dicom_node.catalog import Catalog, JobState, SeriesState, queries
from dicom_node.periodic import PeriodicLoop
from dicom_node.settings import Settings

log = structlog.get_logger(__name__)

#: Job states after which a series holds nothing an operator could still want to act on.
FINISHED = frozenset({JobState.DONE.value, JobState.CANCELLED.value})
_DAY = 86400.0


@dataclass
class GcReport:
    """What one clean-up removed (or, with ``dry_run``, would remove)."""

    series: list[str] = field(default_factory=list)
    jobs: int = 0
    files: int = 0
    bytes: int = 0
    dry_run: bool = False
    #: Drift observations past ``drift.retention_days`` removed (each pair's baseline is kept).
    drift_observations: int = 0


def collectable_series(catalog: Catalog, cutoff: float) -> list[str]:
    """Series complete, untouched and with every job finished since before ``cutoff`` (epoch s)."""
    return queries.collectable_series(catalog, cutoff, FINISHED)


def _remove_file(path: Path, report: GcReport) -> None:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return
    report.files += 1
    report.bytes += size


def _remove_empty_dirs(folder: Path, stop_at: Path) -> None:
    # rmdir, never rmtree: an instance that arrived for this series meanwhile stays.
    while folder != stop_at and stop_at in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def prune_drift(settings: Settings, catalog: Catalog, now: float) -> int:
    """Remove drift observations older than ``drift.retention_days``, keeping the baseline of
    every (model, scanner): its first ``baseline_jobs`` and those of the baseline date range."""
    from dicom_node.catalog.drift import prune_observations

    drift = settings.drift
    if drift.retention_days <= 0:
        return 0
    keep_between = None
    if drift.baseline_start is not None and drift.baseline_end is not None:
        start, end = (datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.UTC).timestamp()
                      for d in (drift.baseline_start, drift.baseline_end))
        keep_between = (start, end)
    removed = prune_observations(catalog, cutoff=now - drift.retention_days * _DAY,
                                 keep_first=drift.baseline_jobs, keep_between=keep_between)
    if removed:
        log.info("drift_observations_collected", count=removed, retention_days=drift.retention_days)
    return removed


def collect_garbage(settings: Settings, catalog: Catalog, *, older_than_days: float | None = None,
                    now: float | None = None, dry_run: bool = False) -> GcReport:
    """Remove the spool files, outbox folders and catalog rows of every collectable series.

    Parameters
    ----------
    settings : Settings
        For the spool root, the outbox and ``storage.retention_days``.
    catalog : Catalog
        Where series, instances and jobs are looked up and deleted.
    older_than_days : float or None
        Overrides ``storage.retention_days`` (which, at 0, disables the clean-up).
    now : float or None
        The current time (epoch seconds); for tests.
    dry_run : bool
        Only report what would be removed.
    """
    days = settings.storage.retention_days if older_than_days is None else older_than_days
    report = GcReport(dry_run=dry_run)
    now = time.time() if now is None else now
    if not dry_run:
        report.drift_observations = prune_drift(settings, catalog, now)
    if days <= 0:
        return report
    cutoff = now - days * _DAY
    root = settings.storage.root
    for uid in collectable_series(catalog, cutoff):
        files, job_ids = queries.series_files_and_jobs(catalog, uid)
        paths = [Path(p) for p in files]
        report.series.append(uid)
        report.jobs += len(job_ids)
        if dry_run:
            for p in paths:
                with contextlib.suppress(OSError):
                    report.bytes += p.stat().st_size
                    report.files += 1
            continue
        for path in paths:
            _remove_file(path, report)
        for path in {p.parent for p in paths}:
            _remove_empty_dirs(path, root)
        for job_id in job_ids:
            outdir = settings.outbox / f"job-{job_id}"
            if outdir.is_dir():
                for f in outdir.iterdir():
                    _remove_file(f, report)
                shutil.rmtree(outdir, ignore_errors=True)
        # Re-check under the delete: an instance that arrived since the query re-opened the series.
        series = catalog.get_series(uid)
        if series is None or series.state != SeriesState.COMPLETE.value or series.last_received_at >= cutoff:
            log.info("series_gc_skipped", series_instance_uid=uid, reason="new instances arrived")
            continue
        catalog.delete_series(uid)
    if report.series:
        log.info("series_collected", count=len(report.series), files=report.files, bytes=report.bytes,
                 jobs=report.jobs, dry_run=dry_run, retention_days=days)
    return report


class RetentionLoop(PeriodicLoop):
    """Runs :func:`collect_garbage` every ``storage.gc_interval_seconds`` in a thread."""

    name = "retention"
    failure_event = "gc_failed"

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        super().__init__()
        self.settings = settings
        self.catalog = catalog

    @property
    def enabled(self) -> bool:
        """True when ``storage.retention_days`` or ``drift.retention_days`` asks for a clean-up."""
        return self.settings.storage.retention_days > 0 or self.settings.drift.retention_days > 0

    def interval(self) -> float:
        return self.settings.storage.gc_interval_seconds

    def run_once(self) -> None:
        collect_garbage(self.settings, self.catalog)
