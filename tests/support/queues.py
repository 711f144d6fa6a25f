"""An in-memory :class:`dicom_node.scheduling.jobs.JobQueue`: what would have been sent to Celery."""

from __future__ import annotations


class MemoryQueue:
    """Records every enqueue: ``inference`` as (job id, priority), ``dispatch`` as job ids."""

    def __init__(self) -> None:
        self.inference: list[tuple[int, str]] = []
        self.dispatch: list[int] = []

    def enqueue_inference(self, job_id: int, priority: str) -> None:
        self.inference.append((job_id, priority))

    def enqueue_dispatch(self, job_id: int) -> None:
        self.dispatch.append(job_id)
