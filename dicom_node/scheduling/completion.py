"""Completion: decide when a series is complete, route it and queue its jobs.

A series is complete when no instance arrived for ``completion.idle_seconds``, or earlier when
the association that sent it was released and the instance count reached the expected count:
the series' own (ImagesInAcquisition, times NumberOfTemporalPositions for dynamic series; one
enhanced multi-frame instance), else the ``expected_instances`` of a routing rule it matches.

The same loop re-sends jobs whose broker message was lost (:func:`dicom_node.scheduling.jobs.requeue_stale_jobs`),
so a broker that restarts without its data loses no job while the node keeps running.
"""

from __future__ import annotations

import threading
import time

import structlog

from dicom_node.catalog import Catalog, JobSpec, SeriesRow
from dicom_node.scheduling.jobs import JobQueue, queue_job, requeue_stale_jobs
from dicom_node.scheduling.routing import matching_rules
from dicom_node.settings import Settings

log = structlog.get_logger(__name__)


class CompletionLoop:
    """Polls the catalog for complete series and turns them into queued jobs."""

    def __init__(self, settings: Settings, catalog: Catalog, queue: JobQueue) -> None:
        self.settings = settings
        self.catalog = catalog
        self.queue = queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        # Stale jobs are looked for a few times per ``requeue_after_seconds`` (at most every minute).
        self._sweep_every = min(60.0, max(0.5, settings.worker.requeue_after_seconds / 4))
        self._next_sweep = time.monotonic() + self._sweep_every

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.completion.poll_seconds):
            try:
                self.tick()
            except Exception:  # process boundary: keep completing series after a hiccup
                log.exception("completion_tick_failed")
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self._sweep_every
                try:
                    self.sweep()
                except Exception:  # process boundary: a broker outage must not stop completion
                    log.exception("stale_job_sweep_failed")

    def sweep(self, now: float | None = None) -> list[int]:
        """Re-send jobs whose broker message was lost (see :func:`requeue_stale_jobs`)."""
        s = self.settings
        after = s.worker.requeue_after_seconds
        return requeue_stale_jobs(self.catalog, self.queue, stale_after=after,
                                  running_after=after + s.worker.time_limit,
                                  delivering_after=after + s.delivery.backoff_max_seconds + 60.0, now=now)

    def _rule_count(self, series: SeriesRow) -> int | None:
        """The largest ``expected_instances`` of the rules matching ``series`` (None if none)."""
        counts = [rule.expected_instances for rule in matching_rules(self.settings.rules, series.routing_attributes())
                  if rule.expected_instances is not None]
        return max(counts) if counts else None

    def tick(self, now: float | None = None) -> list[int]:
        """Complete every due series; return the ids of the jobs queued."""
        now = time.time() if now is None else now
        queued: list[int] = []
        for series in self.catalog.due_series(now, self.settings.completion.idle_seconds, self._rule_count):
            uid = series.series_instance_uid
            reason = "idle" if series.last_received_at + self.settings.completion.idle_seconds <= now else "association"
            rules = matching_rules(self.settings.rules, series.routing_attributes())
            specs = [JobSpec(uid, rule.name, model, rule.destinations, rule.priority.value)
                     for rule in rules for model in rule.models]
            note = None if specs else "no routing rule matched"
            self.catalog.mark_series_complete(uid, reason, note)
            log.info("series_completed", series_instance_uid=uid, study_instance_uid=series.study_instance_uid,
                     instances=series.instance_count, reason=reason, rules=[r.name for r in rules],
                     calling_ae_title=series.calling_ae_title)
            for job_id in self.catalog.create_jobs(specs):
                queue_job(self.catalog, self.queue, job_id, reason=f"series complete ({reason})")
                queued.append(job_id)
        return queued
