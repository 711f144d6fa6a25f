"""How the control plane hands work to workers, without knowing it is Celery.

``workers.app.CeleryJobQueue`` implements :class:`JobQueue`; the completion loop and the CLI
only see this protocol.  Messages carry job ids, never pixel data.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from dicom_node.catalog import Catalog, CatalogError, JobState

log = structlog.get_logger(__name__)


class JobQueue(Protocol):
    def enqueue_inference(self, job_id: int, priority: str) -> None: ...

    def enqueue_dispatch(self, job_id: int) -> None: ...


def queue_job(catalog: Catalog, queue: JobQueue, job_id: int, *, reason: str | None = None) -> None:
    """Mark a job ``queued`` and send it to the inference queue (or, if its results are
    already encoded, to the dispatch queue)."""
    job = catalog.get_job(job_id)
    if job is None:
        raise CatalogError(f"unknown job {job_id}")
    if job.results and job.state in (JobState.FAILED.value, JobState.DELIVERING.value) and job.encoded_at:
        # Results exist: only the delivery has to be redone.
        catalog.transition(job_id, JobState.ENCODED, reason=reason or "delivery retried")
        catalog.reset_deliveries(job_id)
        queue.enqueue_dispatch(job_id)
        return
    catalog.transition(job_id, JobState.QUEUED, reason=reason)
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
