"""Celery tasks: thin glue.  They own retries and job states; the work is in ``pipeline``.

Both tasks are idempotent (result UIDs derive from series + model + version), which is what
makes ``acks_late`` + ``reject_on_worker_lost`` safe: a job whose worker died runs again and
produces the very same objects.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

import inference
from dicom_node import errors
from dicom_node.catalog import Catalog, CatalogError, JobState
from dicom_node.logs import scrub_known_phi
from workers.names import DISPATCH_QUEUE, DISPATCH_TASK, INFERENCE_TASK, backoff_seconds
from workers.pipeline import WorkerContext, build_context, deliver, run_inference

log = structlog.get_logger(__name__)

PERMANENT = (errors.PermanentError, inference.PermanentError)
TRANSIENT = (errors.TransientError, inference.TransientError)


class NodeTask(Task):  # type: ignore[misc]  # celery is untyped
    """Holds the per-process :class:`WorkerContext`, created on first use (after fork)."""

    _ctx: WorkerContext | None = None
    _parent_catalog: Catalog | None = None

    @property
    def ctx(self) -> WorkerContext:
        if NodeTask._ctx is None:
            NodeTask._ctx = build_context(self.app.dicom_node_settings)
        return NodeTask._ctx

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Fail the job when the pool child was killed at the hard time limit.

        Celery calls this in the worker's main process for a hard time limit and acknowledges the
        message (``task_acks_on_failure_or_timeout``), so without it the job would stay
        ``running`` until the stale-job sweep finds it.  Hung inference would hang again: the
        job fails at once with the reason, as at the soft limit.
        """
        if not isinstance(exc, TimeLimitExceeded) or not args or not isinstance(args[0], int):
            return
        settings = self.app.dicom_node_settings
        if NodeTask._parent_catalog is None:
            # Not the child's WorkerContext: no model registry (nor CUDA) in the main process.
            NodeTask._parent_catalog = Catalog(settings.database.url)
        what = "inference" if self.name == INFERENCE_TASK else "delivery"
        reason = f"{what} exceeded the hard time limit of {settings.worker.time_limit:g} s (worker process killed)"
        try:
            NodeTask._parent_catalog.transition(args[0], JobState.FAILED, reason=reason)
        except CatalogError as exc2:
            log.warning("job_fail_skipped", job_id=args[0], error=str(exc2))
            return
        log.error("job_failed", job_id=args[0], reason=reason)


def _fail(ctx: WorkerContext, job_id: int, reason: str) -> None:
    try:
        ctx.catalog.transition(job_id, JobState.FAILED, reason=reason)
    except CatalogError as exc:
        log.warning("job_fail_skipped", job_id=job_id, error=str(exc))
    log.error("job_failed", job_id=job_id, reason=reason)


def inference_task(task: NodeTask, job_id: int) -> str:
    ctx = task.ctx
    job = ctx.catalog.get_job(job_id)
    if job is None or job.state not in (JobState.QUEUED.value, JobState.RUNNING.value):
        log.info("job_skipped", job_id=job_id, state=job.state if job else None)
        return "skipped"
    max_attempts = ctx.settings.worker.max_attempts
    if job.attempts >= max_attempts:
        # Every earlier attempt died without recording an outcome (worker killed, hard limit).
        _fail(ctx, job_id, f"stopped after {job.attempts} attempts: the worker died or hit the "
                           f"time limit each time (poison job)")
        return "failed"
    job = ctx.catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED, JobState.RUNNING),
                                 count_attempt=True)
    try:
        results = run_inference(ctx, job)
    except PERMANENT as exc:
        _fail(ctx, job_id, scrub_known_phi(str(exc)))
        return "failed"
    except SoftTimeLimitExceeded:
        _fail(ctx, job_id, f"inference exceeded the soft time limit of {ctx.settings.worker.soft_time_limit:g} s")
        return "failed"
    except Exception as exc:  # process boundary: a model crash becomes a job state
        transient = isinstance(exc, TRANSIENT)
        if transient:
            # Our own words (TransientError), with any patient value this worker saw removed.
            reason = f"transient error: {type(exc).__name__}: {scrub_known_phi(str(exc))}"
        else:
            log.exception("inference_crashed", job_id=job_id, model=job.model)
            # A library's message may quote input values: only the type goes into the reason.
            reason = f"model crashed: {type(exc).__name__} (traceback in the worker log)"
        if job.attempts < max_attempts:
            ctx.catalog.transition(job_id, JobState.QUEUED, reason=f"attempt {job.attempts} failed, retrying: {reason}")
            # No exc=: Celery would log its message unscrubbed-by-us in its "retry" line.
            raise task.retry(countdown=backoff_seconds(job.attempts, 1.0, 60.0),
                             max_retries=max_attempts) from None
        _fail(ctx, job_id, f"{reason} (after {job.attempts} attempts)")
        return "failed"
    ctx.catalog.set_results(job_id, results)
    try:
        ctx.catalog.transition(job_id, JobState.ENCODED, expect=(JobState.RUNNING,))
    except CatalogError as exc:  # cancelled (or re-queued by an operator) while the model ran
        log.info("job_cancelled_while_running", job_id=job_id, error=str(exc))
        return "cancelled"
    task.app.send_task(DISPATCH_TASK, args=[job_id], queue=DISPATCH_QUEUE)
    return "encoded"


def dispatch_task(task: NodeTask, job_id: int) -> str:
    ctx = task.ctx
    job = ctx.catalog.get_job(job_id)
    if job is None or job.state not in (JobState.ENCODED.value, JobState.DELIVERING.value):
        log.info("dispatch_skipped", job_id=job_id, state=job.state if job else None)
        return "skipped"
    if job.shadow:
        return finish_shadow(ctx, job_id)
    job = ctx.catalog.transition(job_id, JobState.DELIVERING, expect=(JobState.ENCODED, JobState.DELIVERING))
    delivery = ctx.settings.delivery
    try:
        pending = deliver(ctx, job)
    except PERMANENT as exc:
        _fail(ctx, job_id, scrub_known_phi(str(exc)))
        return "failed"
    except Exception as exc:  # process boundary
        log.exception("dispatch_crashed", job_id=job_id)
        # Counted as an attempt of every destination still to do, so the limit holds.
        error = f"delivery crashed ({type(exc).__name__}, traceback in the worker log)"
        for d in ctx.catalog.deliveries(job_id):
            if d.state != "done":
                ctx.catalog.record_delivery(job_id, d.destination, ok=False, error=error)
        pending = [error]
    if not pending:
        done = ctx.catalog.transition(job_id, JobState.DONE)
        log.info("job_done", job_id=job_id)
        compare_shadow(ctx, done)
        return "done"
    attempts = max((d.attempts for d in ctx.catalog.deliveries(job_id) if d.state != "done"), default=1)
    reason = "; ".join(pending)
    if attempts >= delivery.max_attempts:
        _fail(ctx, job_id, f"delivery failed after {attempts} attempts: {reason}")
        return "failed"
    countdown = backoff_seconds(attempts, delivery.backoff_seconds, delivery.backoff_max_seconds)
    log.info("delivery_retry_scheduled", job_id=job_id, attempt=attempts, countdown=round(countdown, 2))
    # Shown as "next attempt at" (dashboard, /api/jobs/{id}, dicom-node jobs); cleared by the
    # attempt itself (Catalog.record_delivery).
    ctx.catalog.schedule_delivery_retry(job_id, time.time() + countdown)
    # The task is registered with max_retries=None (Celery's default is 3, which ended the
    # retries silently before [delivery] max_attempts and left the job "delivering").
    raise task.retry(countdown=countdown)


def finish_shadow(ctx: WorkerContext, job_id: int) -> str:
    """A shadow job is done once encoded: nothing is dispatched, no delivery is recorded (also
    when an operator's resend or retry, or the reconciliation, queued it for dispatch)."""
    try:
        job = ctx.catalog.transition(job_id, JobState.DONE, expect=(JobState.ENCODED, JobState.DELIVERING),
                                     reason="shadow: results kept in the node, not dispatched")
    except CatalogError as exc:
        log.info("dispatch_skipped", job_id=job_id, error=str(exc))
        return "skipped"
    log.info("job_done", job_id=job_id, mode="shadow")
    compare_shadow(ctx, job)
    return "done"


def compare_shadow(ctx: WorkerContext, job: Any) -> None:
    """Compare a just-done job with the done jobs of the other mode on its series (shadow mode);
    a failure is logged, never the job's: the comparison is an observation, not a result."""
    from dicom_node.shadow import compare_job

    try:
        compare_job(ctx.catalog, ctx.settings.outbox, job)
    except Exception:  # process boundary: the job is done whatever the comparison does
        log.exception("shadow_compare_failed", job_id=job.id)


def register_tasks(app: Celery) -> None:
    """Register both tasks on ``app`` under their fixed names."""
    # max_retries=None: no Celery limit on retries; the attempt limits are ours, counted in the
    # catalog ([worker] max_attempts, [delivery] max_attempts), which end a job as "failed".
    common: dict[str, Any] = {"bind": True, "base": NodeTask, "acks_late": True, "reject_on_worker_lost": True,
                              "max_retries": None}
    app.task(name=INFERENCE_TASK, **common)(inference_task)
    app.task(name=DISPATCH_TASK, **common)(dispatch_task)
