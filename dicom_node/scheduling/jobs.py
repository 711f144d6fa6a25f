"""How the control plane hands work to workers, without knowing it is Celery.

``workers.app.CeleryJobQueue`` implements :class:`JobQueue`; the completion loop and the CLI
only see this protocol.  Messages carry job ids, never pixel data.
"""

from __future__ import annotations

import time
from typing import Protocol

import structlog

from dicom_node.catalog import Catalog, CatalogError, DatabaseError, JobState

log = structlog.get_logger(__name__)


class JobQueue(Protocol):
    def enqueue_inference(self, job_id: int, priority: str) -> None: ...

    def enqueue_dispatch(self, job_id: int) -> None: ...


def queue_job(catalog: Catalog, queue: JobQueue, job_id: int, *, reason: str | None = None,
              reset_attempts: bool = False) -> None:
    """Mark a job ``queued`` and send it to the inference queue (or, if its results are
    already encoded, to the dispatch queue).

    ``reset_attempts`` (an operator's retry, never the automatic sweeps) starts the inference
    and delivery attempt counts again from 0, so a job failed at ``[worker] max_attempts`` or
    ``[delivery] max_attempts`` really runs again instead of failing at once as a poison job.
    """
    job = catalog.get_job(job_id)
    if job is None:
        raise CatalogError(f"unknown job {job_id}")
    if job.results and job.state in (JobState.FAILED.value, JobState.DELIVERING.value) and job.encoded_at:
        # Results exist: only the delivery has to be redone.
        catalog.transition(job_id, JobState.ENCODED, reason=reason or "delivery retried")
        catalog.reset_deliveries(job_id, reset_attempts=reset_attempts)
        queue.enqueue_dispatch(job_id)
        return
    catalog.transition(job_id, JobState.QUEUED, reason=reason, reset_attempts=reset_attempts)
    if reset_attempts:
        catalog.reset_deliveries(job_id, reset_attempts=True)
    queue.enqueue_inference(job_id, job.priority)


def reconcile_jobs(catalog: Catalog, queue: JobQueue) -> int:
    """Re-enqueue every unfinished job (after a crash of the node, a worker or the broker).

    Tasks are idempotent (deterministic result UIDs), so a job that was still in the broker
    and runs twice produces the same objects, never duplicates.
    """
    count = 0
    for job in catalog.unfinished_jobs():
        try:
            if job.state == JobState.ENCODED.value or (job.state == JobState.DELIVERING.value and job.results):
                queue.enqueue_dispatch(job.id)
            else:
                catalog.transition(job.id, JobState.QUEUED, reason="re-enqueued at start-up")
                queue.enqueue_inference(job.id, job.priority)
            count += 1
        except CatalogError as exc:
            log.warning("job_reconcile_skipped", job_id=job.id, error=str(exc))
    if count:
        log.info("jobs_reconciled", count=count)
    return count


def _busy_job_ids(catalog: Catalog, now: float) -> set[int] | None:
    """Jobs an alive worker says it is running now (``None``: heartbeats unavailable)."""
    from dicom_node.catalog import heartbeats as heartbeat

    try:
        return {w.current_job_id for w in heartbeat.alive_workers(catalog, now=now)
                if w.current_job_id is not None}
    except DatabaseError as exc:  # e.g. no heartbeat table yet: judge by job age alone
        log.warning("heartbeats_unreadable", error=str(exc)[:200])
        return None


def requeue_stale_jobs(catalog: Catalog, queue: JobQueue, *, stale_after: float, running_after: float,
                       delivering_after: float, now: float | None = None) -> list[int]:
    """Send again every unfinished job whose broker message must have been lost; return their ids.

    The catalog is the source of truth and the broker may forget (a Redis restarted without its
    data, a message acknowledged by a worker that then hit its hard time limit).  A job counts
    as lost when it has not moved for:

    - ``stale_after`` seconds in ``received``/``queued`` while no alive worker is busy (a busy
      worker means a legitimate backlog), or in ``encoded``;
    - ``running_after`` seconds in ``running`` and no alive worker reports running it;
    - ``delivering_after`` seconds in ``delivering`` (longer than any retry countdown).

    Sending a job twice is harmless: tasks skip jobs already past their state and results have
    deterministic UIDs.  Each re-send is a ``queued`` transition (or a ``job_events`` row), so a
    job is re-sent at most once per period.
    """
    now = time.time() if now is None else now
    busy = _busy_job_ids(catalog, now)
    requeued: list[int] = []
    for job in catalog.unfinished_jobs():
        age = now - job.updated_at
        if busy is not None and job.id in busy:
            continue
        try:
            if job.state in (JobState.RECEIVED.value, JobState.QUEUED.value):
                if age < stale_after or busy:
                    continue
                queue_job(catalog, queue, job.id, reason=f"re-enqueued: not picked up in {age:.0f} s")
            elif job.state == JobState.RUNNING.value:
                if age < running_after:
                    continue
                queue_job(catalog, queue, job.id, reason=f"re-enqueued: running for {age:.0f} s with no worker on it")
            elif job.state == JobState.ENCODED.value:
                if age < stale_after:
                    continue
                catalog.transition(job.id, JobState.ENCODED, reason="dispatch re-sent")
                queue.enqueue_dispatch(job.id)
            elif job.state == JobState.DELIVERING.value:
                if age < delivering_after:
                    continue
                queue_job(catalog, queue, job.id, reason=f"delivery re-sent after {age:.0f} s without progress")
            else:
                continue
        except CatalogError as exc:  # the job moved meanwhile: nothing is lost
            log.info("job_requeue_skipped", job_id=job.id, error=str(exc))
            continue
        requeued.append(job.id)
    if requeued:
        log.warning("stale_jobs_requeued", job_ids=requeued)
    return requeued
