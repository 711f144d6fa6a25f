"""The REST API under ``/api``: jobs, series, destinations, queue, throughput; retry, cancel,
resend, rerun and reprocess.

Reads go straight to the catalog.  Mutating calls (retry, cancel, resend, rerun, reprocess) need
``Authorization: Bearer <web.api_token>``; with no token configured they are refused (403), so a
node is read-only until someone chooses a token.  No patient data: the catalog holds none.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from dicom_node.catalog import (
    QUEUE_OF_STATE,
    UNFINISHED,
    Catalog,
    CatalogError,
    JobRow,
    JobState,
    SeriesRow,
    queries,
)
from dicom_node.catalog.heartbeats import ALIVE_WITHIN_S, warm_by_model, worker_statuses
from dicom_node.catalog.tables import KEEPS_FIRST_INSTANCE
from dicom_node.ingest.rejections import RejectionLog
from dicom_node.metrics import (
    STAGE_DEFINITIONS,
    STAGES,
    stage_durations,
)
from dicom_node.scheduling import operator
from dicom_node.scheduling.jobs import JobQueue
from dicom_node.scheduling.routing import deciding_reasons
from dicom_node.settings import Settings

#: States from which a job may be retried; unfinished jobs are still owned by a worker or queue.
RETRYABLE = (JobState.FAILED, JobState.CANCELLED, JobState.DONE)


@dataclass
class ApiContext:
    """What the API handlers need, built once by :func:`dicom_node.web.app.create_app`."""

    settings: Settings
    catalog: Catalog
    queue: JobQueue
    #: The listener's rejected associations (same process: ``serve`` runs the web server as a
    #: thread beside the listener); None in an app built without a listener.
    rejections: RejectionLog | None = None


# -- response models ------------------------------------------------------------------------


class PeakMemory(BaseModel):
    device: str = Field(description="cpu, cuda:0...")
    kind: str = Field(description="cuda_allocated: peak bytes PyTorch allocated on the GPU during the run; "
                                  "rss: growth of the worker process's peak resident memory over the run; "
                                  "rss_lifetime: growth of the process's all-time peak (no per-job reset).")
    peak_bytes: int
    peak_mib: float


class JobSummary(BaseModel):
    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    series_description: str | None = Field(default=None, description="Of the series (no patient data).")
    body_part_examined: str | None = None
    calling_ae_title: str | None = Field(default=None, description="The AE title that sent the series.")
    study_date: str | None = Field(default=None, description="StudyDate of the series (YYYYMMDD), if known.")
    rule: str
    model: str
    priority: str
    state: str
    mode: str = Field(default="live", description="live, or shadow: results kept in the node, never dispatched.")
    state_label: str = Field(default="", description="The state as shown: 'done (shadow)' for a shadow job.")
    reason: str | None
    attempts: int
    generation: int
    destinations: list[str]
    created_at: float
    updated_at: float
    age_s: float = Field(description="Seconds since the job was created.")
    queued_at: float | None
    running_at: float | None
    encoded_at: float | None
    delivering_at: float | None
    done_at: float | None
    failed_at: float | None
    stages: dict[str, float | None] = Field(
        description="Seconds per stage: "
        + "; ".join(f"{k}: {v}" for k, v in STAGE_DEFINITIONS.items())
    )
    end_to_end_s: float | None = Field(description="Last instance received to results delivered.")
    next_attempt_at: float | None = Field(
        default=None, description="When a delivery that failed transiently is tried again (epoch s); "
                                  "null when none is scheduled.")
    peak_memory: PeakMemory | None = Field(
        None, description="Peak memory of the model run (null until the job was encoded).")
    model_warm: bool | None = Field(
        None, description="Whether the model was already loaded in the worker process (false: "
                          "the inference time includes loading it).")


class JobEvent(BaseModel):
    id: int
    state: str
    at: float
    detail: str | None


class DeliveredObject(BaseModel):
    sop_instance_uid: str
    sop_class: str | None = Field(description="SOP class name, e.g. Segmentation Storage.")
    outcome: str = Field(description="sent, refused (class not accepted at negotiation), "
                                     "confirmed or unconfirmed (C-FIND verification).")
    status: int | None = Field(description="C-STORE status (or STOW-RS outcome) when sent.")
    detail: str | None = Field(description='Why refused/unconfirmed, or the warning: '
                                           '"refused: Segmentation Storage not accepted".')


class Delivery(BaseModel):
    destination: str
    state: str
    attempts: int
    last_error: str | None
    last_attempt_at: float | None
    done_at: float | None
    next_attempt_at: float | None = Field(
        None, description="When this delivery is tried again after a transient failure (epoch s); "
                          "null when no attempt is scheduled.")
    objects: list[DeliveredObject] = Field(
        default_factory=list, description="Per-object outcome of the last attempt.")
    confirmation: str | None = Field(
        None, description='commitment = "find": confirmed (every sent object found by C-FIND) or '
                          "unconfirmed; null when not verified.")


class JobDetail(JobSummary):
    events: list[JobEvent]
    deliveries: list[Delivery]
    results: dict[str, Any] = Field(
        description="Timings, result UIDs and file count (no file paths)."
    )
    actions: list[str] = Field(description="Actions the job's state allows: retry, cancel.")


class ActionResult(BaseModel):
    job_id: int
    state: str
    message: str


class OperatorResult(BaseModel):
    job_ids: list[int] = Field(description="Jobs queued or re-queued by the action.")
    messages: list[str] = Field(description="One sentence per step (also for series left alone).")


class UnmatchedSeries(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    series_description: str | None
    calling_ae_title: str | None
    study_date: str | None = None
    instance_count: int
    generation: int
    completed_at: float | None
    routing: list[str] = Field(
        description="Per rule, the keys that did not match (against the rules as configured now)."
    )


class UnmatchedList(BaseModel):
    total: int
    series: list[UnmatchedSeries]


class SeriesSummary(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    calling_ae_title: str | None
    study_date: str | None = Field(None, description="StudyDate (YYYYMMDD) of its first instance, if known.")
    instance_count: int
    expected_count: int | None
    bytes_received: int
    first_received_at: float
    last_received_at: float
    state: str
    completed_at: float | None
    completion_reason: str | None
    generation: int
    note: str | None


class SeriesDetail(SeriesSummary):
    jobs: list[JobSummary]


class DestinationHealth(BaseModel):
    name: str
    configured: bool = Field(
        description="False for a destination that only appears in old deliveries."
    )
    ae_title: str | None
    host: str | None
    port: int | None
    status: str = Field(
        description="ok (last attempt succeeded), failing, or unknown (never tried)."
    )
    last_success_at: float | None
    last_failure_at: float | None
    last_error: str | None
    delivered: int
    failed: int
    pending: int
    failed_attempts: int
    keeps_first_instance: str | None = Field(
        None, description="Set (with the fix) when a re-run's results with the same SOP Instance UIDs did "
                          "not replace the archive's earlier objects: a corrected result does not show there.")


class RejectedAssociation(BaseModel):
    at: float = Field(description="When the request was rejected (epoch s).")
    calling_ae_title: str
    called_ae_title: str
    peer: str = Field(description="Address and port of the peer.")
    reason: str = Field(description="The A-ASSOCIATE-RJ reason sent.")


class RejectedAssociations(BaseModel):
    total: int = Field(description="Rejections since the node started.")
    kept: int = Field(description="At most this many of the newest are listed.")
    rejections: list[RejectedAssociation] = Field(description="Newest first.")


class QueueDepth(BaseModel):
    queue: str
    priority: str
    depth: int
    oldest_age_s: float | None


class Worker(BaseModel):
    hostname: str
    pid: int
    queues: list[str]
    device: str | None
    alive: bool
    last_seen: float
    age_s: float
    current_job_id: int | None
    current_model: str | None
    current_since: float | None
    warm_models: list[str] = Field(
        default_factory=list, description="Models the process holds in memory, least recently used first.")


class WarmOn(BaseModel):
    hostname: str
    pid: int
    device: str | None
    version: str | None
    loaded_at: float | None
    last_used: float | None
    uses: int | None = Field(description="Jobs (and warm-up) that used it since it was loaded.")


class ModelInfo(BaseModel):
    name: str = Field(description="The name rules use.")
    kind: str = Field(description="builtin, plugin, torchscript, monai-bundle or nnunet.")
    version: str | None
    digest: str | None = Field(
        description="SHA-256 (hex) of the weights file(s); part of the results' Device UID. "
        "None for built-in models (no weights) and plugins."
    )
    source: str | None = Field(description="Model folder ([[models]]) or entry point (plugin).")
    devices: list[str] = Field(description="Devices of the live inference workers that run it.")
    rules: list[str] = Field(description="Rules that name the model.")
    warm: bool = Field(False, description="Loaded in at least one live worker process (else cold: "
                                          "its next job loads it first).")
    warm_on: list[WarmOn] = Field(default_factory=list, description="The worker processes holding it.")
    error: str | None = Field(None, description="Why the model's files cannot be read, if they cannot.")


class QueueStatus(BaseModel):
    queues: list[QueueDepth]
    jobs_by_state: dict[str, int]
    workers: list[Worker]
    alive_within_s: float


class Sender(BaseModel):
    calling_ae_title: str
    rule: str = Field(description="First routing rule its series match (empty: none).")
    mode: str = Field(description="association: series without a count complete at association release "
                                  "(learned); idle: they wait for completion.idle_seconds.")
    series: int = Field(description="Completed series remembered (at most completion.history_size).")
    splits: int = Field(description="Of those, continued in a later association after one was released.")
    split_rate: float
    premature: int = Field(description="Of those, completed at release and then continued.")


class Throughput(BaseModel):
    window_s: float
    instances: int
    bytes: int
    instances_per_minute: float
    studies: int
    studies_per_hour: float
    jobs_done: int
    jobs_failed: int
    per_minute: list[int] = Field(description="Instances received per minute, oldest first.")


# -- helpers --------------------------------------------------------------------------------


def _action_responses(not_found: str, conflict: str | None = None) -> dict[int | str, dict[str, Any]]:
    """The error answers of an operator action: token checks, then what it acts on."""
    responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing or wrong token"},
        403: {"description": "no API token configured"},
        404: {"description": not_found},
    }
    if conflict is not None:
        responses[409] = {"description": conflict}
    return responses


def _summary(
    ctx: ApiContext, job: JobRow, series: SeriesRow | None, last_received: float | None, now: float,
    next_attempt_at: float | None = None,
) -> JobSummary:
    return JobSummary(
        id=job.id,
        series_instance_uid=job.series_instance_uid,
        study_instance_uid=job.study_instance_uid,
        modality=job.modality,
        series_description=series.series_description if series is not None else None,
        body_part_examined=series.body_part_examined if series is not None else None,
        calling_ae_title=series.calling_ae_title if series is not None else None,
        study_date=series.study_date if series is not None else None,
        rule=job.rule,
        model=job.model,
        priority=job.priority,
        state=job.state,
        mode=job.mode,
        state_label=job.state_label,
        reason=job.reason,
        attempts=job.attempts,
        generation=job.generation,
        destinations=job.destinations,
        created_at=job.created_at,
        updated_at=job.updated_at,
        age_s=max(0.0, now - job.created_at),
        queued_at=job.queued_at,
        running_at=job.running_at,
        encoded_at=job.encoded_at,
        delivering_at=job.delivering_at,
        done_at=job.done_at,
        failed_at=job.failed_at,
        stages=stage_durations(job, series),
        peak_memory=_peak_memory(job.results),
        model_warm=job.results.get("model_warm") if isinstance(job.results.get("model_warm"), bool) else None,
        end_to_end_s=(
            job.done_at - last_received
            if job.state == JobState.DONE.value
            and not job.shadow  # a shadow job delivers nothing
            and job.done_at is not None
            and last_received is not None
            and job.done_at >= last_received
            else None
        ),
        next_attempt_at=next_attempt_at,
    )


def _peak_memory(results: dict[str, Any]) -> PeakMemory | None:
    memory = results.get("memory") if results else None
    if not isinstance(memory, dict):
        return None
    try:
        return PeakMemory(**memory)
    except ValueError:  # written by another version: shown in results, not here
        return None


def _summaries(ctx: ApiContext, jobs: list[JobRow]) -> list[JobSummary]:
    now = time.time()
    series = queries.series_by_uid(ctx.catalog, {j.series_instance_uid for j in jobs})
    retries = queries.next_delivery_attempts(ctx.catalog, [j.id for j in jobs])
    out = []
    for job in jobs:
        row = series.get(job.series_instance_uid)
        # The series' last instance is the job's only if no late instance re-opened it since.
        last = (
            row.last_received_at
            if row is not None and row.last_received_at <= job.created_at
            else None
        )
        out.append(_summary(ctx, job, row, last, now, retries.get(job.id)))
    return out


def _series_summary(ctx: ApiContext, row: SeriesRow) -> SeriesSummary:
    return SeriesSummary(
        series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid,
        modality=row.modality,
        body_part_examined=row.body_part_examined,
        series_description=row.series_description,
        calling_ae_title=row.calling_ae_title,
        study_date=row.study_date,
        instance_count=row.instance_count,
        expected_count=row.expected_count,
        bytes_received=row.bytes_received,
        first_received_at=row.first_received_at,
        last_received_at=row.last_received_at,
        state=row.state,
        completed_at=row.completed_at,
        completion_reason=row.completion_reason,
        generation=row.generation,
        note=row.note,
    )


def _public_results(results: dict[str, Any]) -> dict[str, Any]:
    # File paths reveal the outbox layout and nothing useful to a dashboard user.
    if not results:
        return {}
    out = {k: v for k, v in results.items() if k not in ("files", "excluded")}
    out["file_count"] = len(results.get("files", []))
    out["excluded_count"] = len(results.get("excluded", []))
    return out


def _actions(state: str) -> list[str]:
    actions = []
    if state in {s.value for s in RETRYABLE}:
        actions.append("retry")
    if state in {s.value for s in UNFINISHED}:
        actions.append("cancel")
    return actions


def _token_dependency(settings: Settings) -> Callable[[Request], None]:
    def require_token(request: Request) -> None:
        expected = settings.web.api_token
        if not expected:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "mutating API calls are disabled because no API token is configured; set "
                "[web] api_token in the configuration file (or DICOM_NODE_WEB__API_TOKEN) and "
                "send it as 'Authorization: Bearer <token>'",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "this call needs an 'Authorization: Bearer <token>' header",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "the API token is wrong",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    return require_token


# -- router ---------------------------------------------------------------------------------


def create_router(ctx: ApiContext) -> APIRouter:
    """The ``/api`` routes bound to ``ctx``."""
    router = APIRouter(prefix="/api")
    authorized = [Depends(_token_dependency(ctx.settings))]
    catalog = ctx.catalog

    def get_job_or_404(job_id: int) -> JobRow:
        job = catalog.get_job(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
        return job

    @router.get(
        "/jobs", response_model=list[JobSummary], tags=["jobs"], summary="List jobs, newest first"
    )
    def list_jobs(
        state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[JobSummary]:
        return _summaries(ctx, catalog.list_jobs(state.value if state else None, limit=limit))

    @router.get(
        "/jobs/{job_id}",
        response_model=JobDetail,
        tags=["jobs"],
        summary="A job with its timeline, stage durations and deliveries",
    )
    def job_detail(job_id: int) -> JobDetail:
        now = time.time()
        history = queries.job_history(catalog, job_id)
        if history is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
        job, events, deliveries = history.job, history.events, history.deliveries
        waiting = job.state in (JobState.ENCODED.value, JobState.DELIVERING.value)
        retries = [d.next_attempt_at for d in deliveries if waiting and d.next_attempt_at is not None]
        summary = _summary(ctx, job, history.series, history.last_instance_at, now,
                           min(retries) if retries else None)
        return JobDetail(
            **summary.model_dump(),
            events=[JobEvent(id=e.id, state=e.state, at=e.at, detail=e.detail) for e in events],
            deliveries=[
                Delivery(
                    destination=d.destination,
                    state=d.state,
                    attempts=d.attempts,
                    last_error=d.last_error,
                    last_attempt_at=d.last_attempt_at,
                    done_at=d.done_at,
                    next_attempt_at=d.next_attempt_at if waiting else None,
                    objects=[DeliveredObject.model_validate(o) for o in d.objects],
                    confirmation=d.confirmation,
                )
                for d in deliveries
            ],
            results=_public_results(job.results),
            actions=_actions(job.state),
        )

    @router.post(
        "/jobs/{job_id}/retry",
        response_model=ActionResult,
        tags=["jobs"],
        dependencies=authorized,
        summary="Queue a failed, cancelled or done job again",
        responses=_action_responses("no such job", conflict="the job is still unfinished"),
    )
    def retry_job(job_id: int) -> ActionResult:
        job = get_job_or_404(job_id)
        if job.state not in {s.value for s in RETRYABLE}:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"job {job_id} is {job.state}; only failed, cancelled or done jobs can be retried",
            )
        try:
            operator.retry_job(catalog, ctx.queue, job_id, reason="retried from the web API")
        except CatalogError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        after = get_job_or_404(job_id)
        return ActionResult(
            job_id=job_id,
            state=after.state,
            message=f"job {job_id} sent to the {QUEUE_OF_STATE.get(after.state, 'inference')} "
            "queue",
        )

    @router.post(
        "/jobs/{job_id}/cancel",
        response_model=ActionResult,
        tags=["jobs"],
        dependencies=authorized,
        summary="Cancel an unfinished job (a worker skips it; a running model is not interrupted)",
        responses=_action_responses("no such job", conflict="the job is already finished"),
    )
    def cancel_job(job_id: int) -> ActionResult:
        job = get_job_or_404(job_id)
        try:
            catalog.transition(
                job_id, JobState.CANCELLED, reason="cancelled from the web API", expect=UNFINISHED
            )
        except CatalogError as exc:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"job {job_id} is {job.state} and cannot be cancelled ({exc})",
            ) from None
        return ActionResult(
            job_id=job_id, state=JobState.CANCELLED.value, message=f"job {job_id} cancelled"
        )

    @router.post(
        "/jobs/{job_id}/resend",
        response_model=OperatorResult,
        tags=["jobs"],
        dependencies=authorized,
        summary="Deliver a job's stored results again (no model run), to its destinations or to"
        " ?to=DEST",
        responses=_action_responses("no such job or destination", conflict="the job has no stored results"),
    )
    def resend_job(job_id: int, to: Annotated[list[str] | None, Query()] = None) -> OperatorResult:
        get_job_or_404(job_id)
        try:
            report = operator.resend(catalog, ctx.queue, ctx.settings, str(job_id), to=to or [],
                                     by="web API")
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no destination named {exc}") from None
        except CatalogError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return OperatorResult(job_ids=report.job_ids, messages=report.lines)

    @router.post(
        "/series/{series_instance_uid}/rerun",
        response_model=OperatorResult,
        tags=["series"],
        dependencies=authorized,
        summary="Run a processed series' models again (or only ?model=M) as a new generation",
        responses=_action_responses("no such series", conflict="still receiving, or no model known for it"),
    )
    def rerun_series(series_instance_uid: str, model: str | None = None) -> OperatorResult:
        if catalog.get_series(series_instance_uid) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"series {series_instance_uid} not found")
        try:
            report = operator.rerun(catalog, ctx.queue, ctx.settings, series_instance_uid, model=model,
                                    by="web API")
        except CatalogError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return OperatorResult(job_ids=report.job_ids, messages=report.lines)

    @router.post(
        "/series/{series_instance_uid}/reprocess",
        response_model=OperatorResult,
        tags=["series"],
        dependencies=authorized,
        summary="Apply the routing rules again to a stored series (or every series of a study UID)"
        " as a new generation",
        responses=_action_responses("no such series or study"),
    )
    def reprocess_series(series_instance_uid: str) -> OperatorResult:
        try:
            report = operator.reprocess(catalog, ctx.queue, ctx.settings, series_instance_uid,
                                        by="web API")
        except CatalogError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return OperatorResult(job_ids=report.job_ids, messages=report.lines)

    @router.get(
        "/unmatched-series",
        response_model=UnmatchedList,
        tags=["series"],
        summary="Complete series no routing rule matched (no job), with the keys that decided",
    )
    def unmatched_series(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> UnmatchedList:
        total, rows = queries.unmatched_series(catalog, limit=limit)
        return UnmatchedList(
            total=total,
            series=[
                UnmatchedSeries(
                    series_instance_uid=r.series_instance_uid,
                    study_instance_uid=r.study_instance_uid,
                    modality=r.modality,
                    series_description=r.series_description,
                    calling_ae_title=r.calling_ae_title,
                    study_date=r.study_date,
                    instance_count=r.instance_count,
                    generation=r.generation,
                    completed_at=r.completed_at,
                    routing=deciding_reasons(ctx.settings.rules, r.routing_attributes()),
                )
                for r in rows
            ],
        )

    @router.get(
        "/series",
        response_model=list[SeriesSummary],
        tags=["series"],
        summary="Series, most recently received first",
    )
    def list_series(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[SeriesSummary]:
        return [_series_summary(ctx, r) for r in catalog.list_series(limit=limit)]

    @router.get(
        "/series/{series_instance_uid}",
        response_model=SeriesDetail,
        tags=["series"],
        summary="A series with its jobs",
    )
    def series_detail(series_instance_uid: str) -> SeriesDetail:
        row = catalog.get_series(series_instance_uid)
        if row is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"series {series_instance_uid} not found"
            )
        jobs = queries.jobs_of_series(catalog, series_instance_uid)
        return SeriesDetail(**_series_summary(ctx, row).model_dump(), jobs=_summaries(ctx, jobs))

    @router.get(
        "/destinations",
        response_model=list[DestinationHealth],
        tags=["operations"],
        summary="Per-destination delivery health",
    )
    def destinations() -> list[DestinationHealth]:
        return destination_health(ctx.settings, catalog)

    @router.get(
        "/rejected-associations",
        response_model=RejectedAssociations,
        tags=["operations"],
        summary="The newest association requests the listener rejected, and why",
    )
    def rejected_associations() -> RejectedAssociations:
        log = ctx.rejections
        if log is None:  # no listener in this process (an app built without one)
            return RejectedAssociations(total=0, kept=0, rejections=[])
        return RejectedAssociations(
            total=log.total, kept=log.kept,
            rejections=[RejectedAssociation(at=r.at, calling_ae_title=r.calling_ae_title,
                                            called_ae_title=r.called_ae_title, peer=r.peer, reason=r.reason)
                        for r in log.recent()],
        )

    @router.get(
        "/queue",
        response_model=QueueStatus,
        tags=["operations"],
        summary="Queue depth per queue and priority, and the workers seen",
    )
    def queue_status() -> QueueStatus:
        now = time.time()
        counts = catalog.count_jobs_by_state()
        depth = {key: (n, now - first) for key, (n, first) in catalog.queue_depth().items()}
        keys = sorted(
            set(depth) | {("inference", "urgent"), ("inference", "normal"), ("dispatch", "normal")},
            key=lambda k: (k[0] != "inference", k[1] != "urgent", k),
        )
        queues = [
            QueueDepth(
                queue=q,
                priority=p,
                depth=depth.get((q, p), (0, 0.0))[0],
                oldest_age_s=max(0.0, depth[(q, p)][1]) if (q, p) in depth else None,
            )
            for q, p in keys
        ]
        workers = [
            Worker(
                hostname=w.hostname,
                pid=w.pid,
                queues=list(w.queues),
                device=w.device,
                alive=w.alive,
                last_seen=w.last_seen,
                age_s=w.age_s,
                current_job_id=w.current_job_id,
                current_model=w.current_model,
                current_since=w.current_since,
                warm_models=[str(m.get("name")) for m in w.warm_models],
            )
            for w in worker_statuses(catalog, now=now)
        ]
        return QueueStatus(
            queues=queues,
            jobs_by_state={st.value: counts.get(st.value, 0) for st in JobState},
            workers=workers,
            alive_within_s=ALIVE_WITHIN_S,
        )

    @router.get(
        "/senders",
        response_model=list[Sender],
        tags=["operations"],
        summary="Per sender (calling AE title, rule): completion mode and split rate",
    )
    def senders() -> list[Sender]:
        from dicom_node.catalog.senders import sender_stats

        stats = sender_stats(catalog, ctx.settings.completion.learn_min_series)
        return [Sender(calling_ae_title=st.calling_ae_title, rule=st.rule, mode=st.mode, series=st.series,
                       splits=st.splits, split_rate=round(st.split_rate, 4), premature=st.premature)
                for _, st in sorted(stats.items())]

    @router.get(
        "/models",
        response_model=list[ModelInfo],
        tags=["operations"],
        summary="Models the workers can run: versions, weights digests, devices, rules, warm or cold",
    )
    def models() -> list[ModelInfo]:
        return model_inventory(ctx.settings, catalog)

    @router.get(
        "/throughput",
        response_model=Throughput,
        tags=["operations"],
        summary="Instances per minute and studies per hour over the last hour",
    )
    def throughput(minutes: Annotated[int, Query(ge=1, le=1440)] = 60) -> Throughput:
        return compute_throughput(catalog, window_s=minutes * 60.0)

    return router


def model_inventory(settings: Settings, catalog: Catalog) -> list[ModelInfo]:
    """Every model a worker would register, in the worker's order (built-ins, plugins, then
    ``[[models]]``, a later one replacing an earlier one), read from files: no network loads."""
    from importlib.metadata import entry_points

    from inference.errors import InferenceError
    from inference.formats import ENTRY_POINT_GROUP, builtin_descriptions, describe_configured

    workers = worker_statuses(catalog)
    devices = sorted({w.device or "unknown" for w in workers if w.alive and "inference" in w.queues})
    warm = warm_by_model(workers)
    found: dict[str, ModelInfo] = {}

    def add(name: str, kind: str, **info: Any) -> None:
        rules = [r.name for r in settings.rules if name in r.models]
        on = [WarmOn(**w) for w in warm.get(name, [])]
        found[name] = ModelInfo(name=name, kind=kind, devices=devices, rules=rules, warm=bool(on), warm_on=on,
                                **info)

    for name, builtin_version in builtin_descriptions().items():
        add(name, "builtin", version=builtin_version, digest=None, source=None)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        version = ep.dist.version if ep.dist is not None else None
        add(ep.name, "plugin", version=version, digest=None, source=ep.value)
    for spec in settings.models:
        try:
            info = describe_configured(spec.kind, spec.source, version=spec.version, **spec.options())
        except InferenceError as exc:
            add(spec.name, spec.kind, version=spec.version, digest=None, source=str(spec.source), error=str(exc))
            continue
        add(spec.name, spec.kind, version=info["version"] or None, digest=info["digest"], source=str(spec.source))
    return [found[n] for n in sorted(found)]


def destination_health(settings: Settings, catalog: Catalog) -> list[DestinationHealth]:
    """Delivery health per destination: configured ones first, then any only seen in deliveries."""
    stats: dict[str, dict[str, Any]] = {}
    for row in queries.all_deliveries(catalog):
        st = stats.setdefault(
            row.destination,
            {
                "delivered": 0,
                "failed": 0,
                "pending": 0,
                "failed_attempts": 0,
                "last_success_at": None,
                "last_failure_at": None,
                "last_error": None,
            },
        )
        if row.state == "done":
            st["delivered"] += 1
            st["failed_attempts"] += max(0, row.attempts - 1)
            if row.done_at is not None and (st["last_success_at"] or 0) < row.done_at:
                st["last_success_at"] = row.done_at
        else:
            st["failed" if row.state == "failed" else "pending"] += 1
            st["failed_attempts"] += row.attempts
            if (
                row.state == "failed"
                and row.last_attempt_at is not None
                and (st["last_failure_at"] or 0) < row.last_attempt_at
            ):
                st["last_failure_at"] = row.last_attempt_at
                st["last_error"] = row.last_error
    configured = {d.name: d for d in settings.destinations}
    keeps_first = queries.destination_findings(catalog, KEEPS_FIRST_INSTANCE)
    out = []
    for name in [*configured, *sorted(set(stats) - set(configured))]:
        st = stats.get(
            name,
            {
                "delivered": 0,
                "failed": 0,
                "pending": 0,
                "failed_attempts": 0,
                "last_success_at": None,
                "last_failure_at": None,
                "last_error": None,
            },
        )
        ok_at, bad_at = st["last_success_at"], st["last_failure_at"]
        health = (
            "unknown"
            if ok_at is None and bad_at is None
            else "failing"
            if bad_at is not None and (ok_at is None or bad_at > ok_at)
            else "ok"
        )
        dest = configured.get(name)
        out.append(
            DestinationHealth(
                name=name,
                configured=dest is not None,
                ae_title=dest.ae_title if dest else None,
                host=dest.host if dest else None,
                port=dest.port if dest else None,
                status=health,
                keeps_first_instance=keeps_first.get(name),
                **st,
            )
        )
    return out


def compute_throughput(
    catalog: Catalog, *, window_s: float = 3600.0, now: float | None = None
) -> Throughput:
    """Instances, bytes and studies received, and jobs finished, in the last ``window_s`` s."""
    now = time.time() if now is None else now
    since = now - window_s
    minutes = max(1, round(window_s / 60))
    per_minute = [0] * minutes
    got = queries.received_since(catalog, since)
    for at in got.received_at:
        per_minute[min(minutes - 1, max(0, int((at - since) // 60)))] += 1
    instances, nbytes, studies, done, failed = got.instances, got.bytes, got.studies, got.jobs_done, got.jobs_failed
    return Throughput(
        window_s=window_s,
        instances=int(instances),
        bytes=int(nbytes),
        instances_per_minute=instances / (window_s / 60.0),
        studies=int(studies),
        studies_per_hour=studies / (window_s / 3600.0),
        jobs_done=int(done),
        jobs_failed=int(failed),
        per_minute=per_minute,
    )


__all__ = [
    "RETRYABLE",
    "STAGES",
    "ApiContext",
    "JobDetail",
    "JobSummary",
    "compute_throughput",
    "create_router",
    "destination_health",
]
