"""Completion: decide when a series is complete, route it and queue its jobs.

A series still receiving is complete (checked every ``completion.poll_seconds``, and when an
association grace ends):

* **by count** when the associations that carried it are released and the instance count
  reached the expected count: the series' own (ImagesInAcquisition, times
  NumberOfTemporalPositions for dynamic series; one enhanced multi-frame instance), else the
  ``expected_instances`` of a routing rule it matches (reason ``association``);
* **by its sender** when the series announces no count, every association that carried it is
  released, ``completion.association_grace_seconds`` have passed, and its sender (calling AE
  title + first matching rule) is *learned*: its last ``completion.learn_min_series`` or more
  series (of a history of ``completion.history_size``) all ended with their association
  (reason ``learned``), or the rule says ``completion = "association"`` (``rule association``);
* **by the idle timer** after ``completion.idle_seconds`` without an instance (reason ``idle``),
  but not while an association that carries it is still open (a stalled sender), for at most
  ``completion.max_open_seconds`` without an instance.  A series short of its expected count
  waits ``completion.incomplete_grace_seconds`` more and is then processed with a note
  ("incomplete: received N of M") or refused, per rule (``on_incomplete``): never silently.

An instance after a completion at release is a *premature completion*
(:meth:`dicom_node.catalog.Catalog.record_instances`): the sender's history marks the series
split, so the sender goes back to the idle timer, and the series is reprocessed under the
late-instance policy.

Marking a series complete, creating its jobs and recording it in the sender's history is one
transaction (:func:`dicom_node.catalog.senders.complete_series`); the jobs are then queued.  A
crash in between leaves ``received`` jobs, which :func:`~dicom_node.scheduling.jobs.reconcile_jobs`
queues at the next start.

The same loop re-sends jobs whose broker message was lost (:func:`dicom_node.scheduling.jobs.requeue_stale_jobs`),
so a broker that restarts without its data loses no job while the node keeps running.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import structlog

from dicom_node.catalog import Catalog, JobSpec, SeriesRow
from dicom_node.catalog.senders import SenderStats, complete_series, receiving_series, sender_stats
from dicom_node.periodic import PeriodicLoop
from dicom_node.scheduling.jobs import JobQueue, queue_job, requeue_stale_jobs
from dicom_node.scheduling.routing import matching_rules
from dicom_node.settings import RuleSettings, Settings

log = structlog.get_logger(__name__)

#: Test hook: ``DICOM_NODE_CRASH_POINT=series_completed`` makes the process SIGKILL itself right
#: after a series was marked complete (and its jobs created), before they are queued.
CRASH_POINT_ENV = "DICOM_NODE_CRASH_POINT"


def crash_point(name: str) -> None:
    """SIGKILL this process when ``$DICOM_NODE_CRASH_POINT`` names ``name`` (crash tests)."""
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Decision:
    """Why a series is complete now, and what comes with it."""

    reason: str
    #: Known count not reached: "incomplete: received N of M".
    incomplete: str | None = None


class CompletionLoop(PeriodicLoop):
    """Polls the catalog for complete series and turns them into queued jobs."""

    name = "completion"
    failure_event = "completion_tick_failed"
    join_seconds = 10.0

    def __init__(self, settings: Settings, catalog: Catalog, queue: JobQueue) -> None:
        super().__init__()
        self.settings = settings
        self.catalog = catalog
        self.queue = queue
        # Stale jobs are looked for a few times per ``requeue_after_seconds`` (at most every minute).
        self._sweep_every = min(60.0, max(0.5, settings.worker.requeue_after_seconds / 4))
        self._next_sweep = time.monotonic() + self._sweep_every
        #: When the earliest association grace still running ends (epoch s; None: none runs).
        self._grace_ends: float | None = None

    def pause(self, now: float | None = None) -> float:
        """Seconds to sleep before the next tick: ``poll_seconds``, or less when an association
        grace ends sooner, so a learned sender's series completes at release + grace, not at
        the next poll after it (up to ``poll_seconds`` later: 0.25 s by default)."""
        poll = self.settings.completion.poll_seconds
        if self._grace_ends is None:
            return poll
        now = time.time() if now is None else now
        return min(poll, max(0.005, self._grace_ends - now))

    def interval(self) -> float:
        return self.pause()

    def run_once(self) -> None:
        """One :meth:`tick`, then the stale-job sweep when it is due (also after a failed tick;
        a failed sweep is logged on its own and does not hide the tick's error)."""
        try:
            self.tick()
        finally:
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

    def decide(self, row: SeriesRow, rules: list[RuleSettings], senders: dict[tuple[str, str], SenderStats],
               now: float) -> Decision | None:
        """Whether ``row`` is complete at ``now`` (None: not yet)."""
        c = self.settings.completion
        expected = row.expected_count
        if expected is None:
            counts = [r.expected_instances for r in rules if r.expected_instances is not None]
            expected = max(counts) if counts else None
        open_assocs = row.open_associations or 0
        released = (row.released_at is not None and row.released_at >= row.last_received_at
                    and open_assocs == 0)
        if released and expected is not None and row.instance_count >= expected:
            return Decision("association")
        if released and expected is None and row.released_at is not None \
                and now >= row.released_at + c.association_grace_seconds:
            forced = rules[0].completion if rules else "learn"
            if forced == "association":
                return Decision("rule association")
            if forced == "learn":
                stats = senders.get((row.calling_ae_title or "", rules[0].name if rules else ""))
                if stats is not None and stats.mode == "association":
                    return Decision("learned")
        idle_for = now - row.last_received_at
        if idle_for < c.idle_seconds:
            return None
        if open_assocs > 0 and idle_for < c.max_open_seconds:
            return None  # an association carrying it is open: the sender may only be slow
        if expected is not None and row.instance_count < expected and rules:
            if idle_for < c.idle_seconds + c.incomplete_grace_seconds:
                return None
            return Decision("idle", f"incomplete: received {row.instance_count} of {expected}")
        return Decision("idle")

    def senders(self) -> dict[tuple[str, str], SenderStats]:
        """Each sender's history summary and completion mode (see :func:`sender_stats`)."""
        return sender_stats(self.catalog, self.settings.completion.learn_min_series)

    def tick(self, now: float | None = None) -> list[int]:
        """Complete every due series; return the ids of the jobs queued."""
        now = time.time() if now is None else now
        queued: list[int] = []
        rows = receiving_series(self.catalog)
        self._grace_ends = None
        if not rows:
            return queued
        senders = self.senders()
        for series in rows:
            rules = matching_rules(self.settings.rules, series.routing_attributes())
            decision = self.decide(series, rules, senders, now)
            if decision is None:
                self._note_grace(series, now)
                continue
            queued += self._complete(series, rules, decision)
        return queued

    def _note_grace(self, row: SeriesRow, now: float) -> None:
        """Remember when ``row``'s association grace ends, if it is released, has no count and
        the grace is still running (the next tick is timed for it: see :meth:`pause`)."""
        if row.released_at is None or (row.open_associations or 0) > 0 or row.released_at < row.last_received_at:
            return
        if row.expected_count is not None:
            return
        ends = row.released_at + self.settings.completion.association_grace_seconds
        if ends > now and (self._grace_ends is None or ends < self._grace_ends):
            self._grace_ends = ends

    def _complete(self, series: SeriesRow, rules: list[RuleSettings], decision: Decision) -> list[int]:
        uid = series.series_instance_uid
        reason = decision.reason
        refused = [r for r in rules if decision.incomplete and r.on_incomplete == "refuse"]
        taken = [r for r in rules if r not in refused]
        specs = [JobSpec(uid, rule.name, model, rule.destinations, rule.priority.value, rule.mode)
                 for rule in taken for model in rule.models]
        notes = []
        if decision.incomplete:
            notes.append(decision.incomplete)
        if refused:
            notes.append("refused by rule " + ", ".join(r.name for r in refused) + " (on_incomplete = refuse)")
        if not rules:
            notes.append("no routing rule matched")
        note = "; ".join(notes) or None
        job_ids = complete_series(
            self.catalog, uid, series.generation, reason=reason, note=note, specs=specs,
            rule=rules[0].name if rules else "", history_size=self.settings.completion.history_size,
            job_detail=decision.incomplete,
        )
        if job_ids is None:
            return []  # a late instance came in meanwhile: it is receiving again
        log.info("series_completed", series_instance_uid=uid, study_instance_uid=series.study_instance_uid,
                 instances=series.instance_count, reason=reason, rules=[r.name for r in rules],
                 calling_ae_title=series.calling_ae_title, jobs=len(job_ids))
        if decision.incomplete:
            log.warning("series_incomplete", series_instance_uid=uid, calling_ae_title=series.calling_ae_title,
                        received=series.instance_count, detail=decision.incomplete,
                        processed_by=[r.name for r in taken], refused_by=[r.name for r in refused])
        crash_point("series_completed")
        queued: list[int] = []
        why = f"series complete ({reason})" + (f"; {decision.incomplete}" if decision.incomplete else "")
        for job_id in job_ids:
            queue_job(self.catalog, self.queue, job_id, reason=why)
            queued.append(job_id)
        return queued
