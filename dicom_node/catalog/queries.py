"""Read-only questions the dashboard, the API, metrics and retention ask of the catalog.

Every query of those packages lives here, named for the question it answers, so the SQL of the
node is in one package (``import-linter`` keeps it so).  Rows come back detached: read them,
never write through them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from sqlalchemy import case, distinct, func, select, text
from sqlalchemy.orm import Session

from dicom_node.catalog.store import Catalog
from dicom_node.catalog.tables import (
    DeliveryRow,
    InstanceRow,
    JobEventRow,
    JobRow,
    JobState,
    SeriesRow,
    SeriesState,
    WorkerHeartbeatRow,
)


def ping(catalog: Catalog) -> None:
    """Raise when the database does not answer ``SELECT 1``."""
    with catalog.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def series_by_uid(catalog: Catalog, uids: Collection[str]) -> dict[str, SeriesRow]:
    """The series rows of ``uids`` that exist, by Series Instance UID."""
    if not uids:
        return {}
    with catalog.session() as s:
        rows = s.scalars(select(SeriesRow).where(SeriesRow.series_instance_uid.in_(list(uids))))
        return {r.series_instance_uid: r for r in rows}


def jobs_of_series(catalog: Catalog, series_instance_uid: str) -> list[JobRow]:
    """Every job of one series, oldest first."""
    with catalog.session() as s:
        return list(s.scalars(
            select(JobRow).where(JobRow.series_instance_uid == series_instance_uid).order_by(JobRow.id)
        ))


def _last_instance_before(session: Session, job: JobRow) -> float | None:
    return session.scalar(
        select(func.max(InstanceRow.received_at)).where(
            InstanceRow.series_instance_uid == job.series_instance_uid,
            InstanceRow.received_at <= job.created_at,
        )
    )


@dataclass(frozen=True)
class JobHistory:
    """A job with its series, when the last instance it was made for arrived, its transitions and
    its delivery attempts."""

    job: JobRow
    series: SeriesRow | None
    last_instance_at: float | None
    events: list[JobEventRow]
    deliveries: list[DeliveryRow]


def job_history(catalog: Catalog, job_id: int) -> JobHistory | None:
    """Everything the job page shows, or None for an unknown job."""
    with catalog.session() as s:
        job = s.get(JobRow, job_id)
        if job is None:
            return None
        return JobHistory(
            job=job,
            series=s.get(SeriesRow, job.series_instance_uid),
            last_instance_at=_last_instance_before(s, job),
            events=list(s.scalars(
                select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
            )),
            deliveries=list(s.scalars(
                select(DeliveryRow).where(DeliveryRow.job_id == job_id).order_by(DeliveryRow.id)
            )),
        )


def all_deliveries(catalog: Catalog) -> list[DeliveryRow]:
    """Every delivery attempt row (per-destination health is computed from them)."""
    with catalog.session() as s:
        return list(s.scalars(select(DeliveryRow)))


@dataclass(frozen=True)
class ReceivedSince:
    """What arrived and finished since a moment."""

    instances: int
    bytes: int
    studies: int
    #: When each instance arrived (bucketed by the caller: SQL floor() differs between engines).
    received_at: list[float]
    jobs_done: int
    jobs_failed: int


def received_since(catalog: Catalog, since: float) -> ReceivedSince:
    """Instances, bytes and studies received, and jobs done or failed, since ``since`` (epoch s)."""
    with catalog.session() as s:
        instances, nbytes = s.execute(
            select(func.count(), func.coalesce(func.sum(InstanceRow.size), 0)).where(
                InstanceRow.received_at >= since
            )
        ).one()
        studies = s.scalar(
            select(func.count(distinct(SeriesRow.study_instance_uid)))
            .select_from(InstanceRow)
            .join(SeriesRow, SeriesRow.series_instance_uid == InstanceRow.series_instance_uid)
            .where(InstanceRow.received_at >= since)
        )
        received_at = list(s.scalars(select(InstanceRow.received_at).where(InstanceRow.received_at >= since)))
        done = s.scalar(
            select(func.count()).select_from(JobRow)
            .where(JobRow.done_at >= since, JobRow.state == JobState.DONE.value)
        )
        failed = s.scalar(
            select(func.count()).select_from(JobRow)
            .where(JobRow.failed_at >= since, JobRow.state == JobState.FAILED.value)
        )
    return ReceivedSince(int(instances), int(nbytes), int(studies or 0), received_at, int(done or 0),
                         int(failed or 0))


def failed_delivery_attempts(catalog: Catalog) -> dict[str, int]:
    """Per destination, the delivery attempts that did not end in success."""
    with catalog.session() as s:
        rows = s.execute(
            select(
                DeliveryRow.destination,
                func.sum(DeliveryRow.attempts) - func.sum(case((DeliveryRow.state == "done", 1), else_=0)),
            ).group_by(DeliveryRow.destination)
        )
        return {destination: int(n or 0) for destination, n in rows}


def unconfirmed_objects(catalog: Catalog) -> dict[str, int]:
    """Per destination, the delivered objects a C-FIND or storage commitment did not confirm
    (``unconfirmed``)."""
    out: dict[str, int] = {}
    with catalog.session() as s:
        rows = s.execute(
            select(DeliveryRow.destination, DeliveryRow.objects_json)
            .where(DeliveryRow.objects_json.like('%"unconfirmed"%'))
        )
        for destination, objects in rows:
            n = len([o for o in json.loads(objects or "[]") if o.get("outcome") == "unconfirmed"])
            out[destination] = out.get(destination, 0) + n
    return out


def next_delivery_attempts(catalog: Catalog, job_ids: Collection[int]) -> dict[int, float]:
    """Per job still delivering, the earliest scheduled retry of its deliveries (epoch s)."""
    if not job_ids:
        return {}
    with catalog.session() as s:
        rows = s.execute(
            select(DeliveryRow.job_id, func.min(DeliveryRow.next_attempt_at))
            .join(JobRow, JobRow.id == DeliveryRow.job_id)
            .where(DeliveryRow.job_id.in_(list(job_ids)), DeliveryRow.next_attempt_at.is_not(None),
                   JobRow.state.in_(["encoded", "delivering"]))
            .group_by(DeliveryRow.job_id)
        )
        return {int(job_id): float(at) for job_id, at in rows if at is not None}


def delivered_before(catalog: Catalog, job: JobRow, destination: str) -> set[str]:
    """SOP Instance UIDs that earlier jobs of the same series and model delivered to
    ``destination`` (a re-run sends them again: does the archive replace them?)."""
    out: set[str] = set()
    with catalog.session() as s:
        rows = s.scalars(
            select(DeliveryRow.objects_json)
            .join(JobRow, JobRow.id == DeliveryRow.job_id)
            .where(JobRow.series_instance_uid == job.series_instance_uid, JobRow.model == job.model,
                   JobRow.id != job.id, DeliveryRow.destination == destination,
                   DeliveryRow.done_at.is_not(None), DeliveryRow.objects_json.is_not(None))
        )
        for objects in rows:
            out.update(o["sop_instance_uid"] for o in json.loads(objects or "[]")
                       if o.get("outcome") in ("sent", "confirmed", "unconfirmed"))
    return out


def destination_findings(catalog: Catalog, kind: str) -> dict[str, str]:
    """Destinations with a finding of ``kind``, and its detail (for ``/metrics``, ``/readyz``)."""
    return {f.destination: f.detail for f in catalog.destination_findings() if f.kind == kind}


def confirmation_seconds(catalog: Catalog) -> dict[str, list[float]]:
    """Per destination, the seconds from the C-STORE success to the confirmation (C-FIND or
    storage commitment) of every confirmed object."""
    out: dict[str, list[float]] = {}
    with catalog.session() as s:
        rows = s.execute(
            select(DeliveryRow.destination, DeliveryRow.objects_json)
            .where(DeliveryRow.objects_json.like('%"confirmation_seconds"%'))
        )
        for destination, objects in rows:
            for o in json.loads(objects or "[]"):
                if o.get("outcome") == "confirmed" and o.get("confirmation_seconds") is not None:
                    out.setdefault(destination, []).append(float(o["confirmation_seconds"]))
    return out


def queues_of_live_workers(catalog: Catalog, seen_since: float) -> list[str]:
    """The comma-separated queue lists of the worker processes seen since ``seen_since``."""
    with catalog.session() as s:
        return list(s.scalars(
            select(WorkerHeartbeatRow.queues).where(WorkerHeartbeatRow.last_seen >= seen_since)
        ))


def newest_job_event_id(catalog: Catalog) -> int:
    """The id of the newest job event (0 when there is none)."""
    with catalog.session() as s:
        return int(s.scalar(select(func.max(JobEventRow.id))) or 0)


@dataclass(frozen=True)
class FinishedJob:
    """A job at its first ``done`` event, with what the metrics need to time it."""

    event_id: int
    job: JobRow
    series: SeriesRow | None
    last_instance_at: float | None


def first_done_events(catalog: Catalog, after_event_id: int, batch: int) -> Iterator[tuple[int, FinishedJob | None]]:
    """The ``done`` events after ``after_event_id`` in order, each with its job when it is that
    job's first ``done`` (None for a re-run's later one, a shadow job, or a job since deleted)."""
    last = after_event_id
    while True:
        with catalog.session() as s:
            events = list(s.scalars(
                select(JobEventRow)
                .where(JobEventRow.id > last, JobEventRow.state == JobState.DONE.value)
                .order_by(JobEventRow.id)
                .limit(batch)
            ))
            found: list[tuple[int, FinishedJob | None]] = []
            for ev in events:
                earlier = s.scalar(
                    select(func.count()).where(
                        JobEventRow.job_id == ev.job_id,
                        JobEventRow.state == JobState.DONE.value,
                        JobEventRow.id < ev.id,
                    )
                )
                job = s.get(JobRow, ev.job_id)
                if earlier or job is None or job.mode == "shadow":
                    # A shadow job delivers nothing: it must not count in delivery latencies.
                    found.append((ev.id, None))
                else:
                    found.append((ev.id, FinishedJob(ev.id, job, s.get(SeriesRow, job.series_instance_uid),
                                                     _last_instance_before(s, job))))
        yield from found
        if len(events) < batch:
            return
        last = events[-1].id


def collectable_series(catalog: Catalog, cutoff: float, finished: Collection[str]) -> list[str]:
    """Series complete and untouched since before ``cutoff`` (epoch s) whose jobs are all in a
    ``finished`` state and unchanged since before ``cutoff``."""
    out: list[str] = []
    with catalog.session() as s:
        rows = s.scalars(select(SeriesRow).where(
            SeriesRow.state == SeriesState.COMPLETE.value,
            SeriesRow.last_received_at < cutoff,
            SeriesRow.completed_at < cutoff,
        )).all()
        for row in rows:
            jobs = s.scalars(select(JobRow).where(JobRow.series_instance_uid == row.series_instance_uid)).all()
            if all(j.state in finished and j.updated_at < cutoff for j in jobs):
                out.append(row.series_instance_uid)
    return out


def series_files_and_jobs(catalog: Catalog, series_instance_uid: str) -> tuple[list[str], list[int]]:
    """The spool paths of a series' instances and the ids of its jobs."""
    with catalog.session() as s:
        paths = list(s.scalars(
            select(InstanceRow.path).where(InstanceRow.series_instance_uid == series_instance_uid)
        ))
        job_ids = list(s.scalars(select(JobRow.id).where(JobRow.series_instance_uid == series_instance_uid)))
    return paths, job_ids


def unmatched_series(catalog: Catalog, limit: int = 100) -> tuple[int, list[SeriesRow]]:
    """Complete series with no job in their current generation (no routing rule matched them):
    how many there are, and the ``limit`` most recently received."""
    has_job = (
        select(JobRow.id)
        .where(JobRow.series_instance_uid == SeriesRow.series_instance_uid,
               JobRow.generation == SeriesRow.generation)
        .exists()
    )
    where = (SeriesRow.state == SeriesState.COMPLETE.value, ~has_job)
    with catalog.session() as s:
        count = int(s.scalar(select(func.count()).select_from(SeriesRow).where(*where)) or 0)
        rows = list(s.scalars(select(SeriesRow).where(*where).order_by(SeriesRow.last_received_at.desc()).limit(limit)))
        return count, rows


@dataclass(frozen=True)
class DeliveredJob:
    """A job done within a window, with what its end-to-end time and stages are computed from."""

    job: JobRow
    series: SeriesRow | None
    last_instance_at: float | None


def jobs_first_done_since(catalog: Catalog, since: float) -> list[DeliveredJob]:
    """Jobs in state ``done`` whose results were delivered at or after ``since`` (epoch s), each
    with its series and its last instance received before the job was created.

    A job re-run after ``done`` is left out: its second delivery measures an operator's action,
    not the way of a series through the node (the end-to-end histogram counts a job once too).
    One statement, not one per job: the dashboard asks every few seconds.
    """
    last_instance = (
        select(func.max(InstanceRow.received_at))
        .where(InstanceRow.series_instance_uid == JobRow.series_instance_uid,
               InstanceRow.received_at <= JobRow.created_at)
        .correlate(JobRow)
        .scalar_subquery()
    )
    done_events = (
        select(func.count(JobEventRow.id))
        .where(JobEventRow.job_id == JobRow.id, JobEventRow.state == JobState.DONE.value)
        .correlate(JobRow)
        .scalar_subquery()
    )
    with catalog.session() as s:
        rows = s.execute(
            select(JobRow, SeriesRow, last_instance)
            .outerjoin(SeriesRow, SeriesRow.series_instance_uid == JobRow.series_instance_uid)
            .where(JobRow.state == JobState.DONE.value, JobRow.done_at >= since, done_events <= 1)
            .order_by(JobRow.done_at)
        ).all()
        return [DeliveredJob(job, series, None if last is None else float(last)) for job, series, last in rows]
