"""The catalog: instances, series, jobs, deliveries and every job transition (SQLAlchemy).

SQLite by default, PostgreSQL by URL.  The catalog is the source of truth: the broker only
carries job ids, so a lost broker never loses a job (see :meth:`Catalog.unfinished_jobs`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.attributes import ROUTING_KEYWORDS
from dicom_node.catalog.schema import upgrade_schema
from dicom_node.catalog.tables import (
    _TRANSITIONS,
    COMMITMENT_OPEN,
    COMMITMENT_SUPERSEDED,
    QUEUE_OF_STATE,
    UNFINISHED,
    CatalogError,
    CommitmentRow,
    DeliveryRow,
    DestinationFindingRow,
    InstanceRow,
    JobEventRow,
    JobRow,
    JobState,
    SenderHistoryRow,
    SeriesRow,
    SeriesState,
)
from dicom_node.ingest.events import AssociationSummary, StoredInstance

log = structlog.get_logger(__name__)


#: Completion reasons that did not wait for the idle timer: a later instance of the series was a
#: premature completion.
EARLY_REASONS = frozenset({"association", "learned", "rule association"})


@dataclass(frozen=True)
class JobSpec:
    """A job to create for a completed series (one per (series, model))."""

    series_instance_uid: str
    rule: str
    model: str
    destinations: Sequence[str]
    priority: str = "normal"
    #: ``live`` or ``shadow`` (the rule's ``mode``): a shadow job gets no destinations.
    mode: str = "live"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers don't block the writer; NORMAL sync is durable across process crashes (the
    # spool file, not this row, carries the fsync promise of a C-STORE success).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine; for SQLite, create the folder and set WAL + busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _attr_str(value: Any, limit: int) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _attr_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _attr_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


#: Longest routing attribute value kept (a longer one is cut: rules see its start).
_ROUTING_VALUE_MAX = 256


def routing_json(attributes: Mapping[str, Any]) -> str:
    """The routing attributes present in one instance's ``attributes``, as the JSON kept with its
    series (numbers stay numbers, text is cut at ``_ROUTING_VALUE_MAX``)."""
    kept: dict[str, Any] = {}
    for keyword in ROUTING_KEYWORDS:
        value = attributes.get(keyword)
        if value is None or value == "":
            continue
        kept[keyword] = value if isinstance(value, int | float) else str(value)[:_ROUTING_VALUE_MAX]
    return json.dumps(kept, sort_keys=True)


def study_date(attributes: Mapping[str, Any]) -> str | None:
    """The StudyDate of one instance's ``attributes`` when it is a DA (``YYYYMMDD``), else None:
    a free-text value from a non-conforming sender is not shown as a date."""
    value = str(attributes.get("StudyDate") or "").strip()
    return value if len(value) == 8 and value.isdigit() else None


def expected_instances(attributes: Mapping[str, Any]) -> int | None:
    """How many instances a series announces, from the attributes of one of them (or None).

    * An enhanced multi-frame instance (NumberOfFrames > 1) is the whole series: 1.
    * ImagesInAcquisition N, times NumberOfTemporalPositions T when T > 1: a dynamic series
      whose acquisitions are its temporal positions announces N images per position.  When N
      already counts every position, N x T is never reached and the idle timer completes the
      series - late, never early.
    """
    frames = _attr_int(attributes.get("NumberOfFrames")) or 1
    if frames > 1:
        return 1
    images = _attr_int(attributes.get("ImagesInAcquisition"))
    if images is None or images < 1:
        return None
    positions = _attr_int(attributes.get("NumberOfTemporalPositions")) or 1
    return images * max(positions, 1)


def add_jobs(s: Session, specs: Iterable[JobSpec], now: float, detail: str | None = None) -> list[int]:
    """Add the jobs of ``specs`` in session ``s`` (see :meth:`Catalog.create_jobs`); ``detail``
    is appended to each job's first event (e.g. "incomplete: received 24 of 48")."""
    ids: list[int] = []
    # A model that a live and a shadow rule both give the series runs once, live: its results
    # must reach the live rule's destinations.
    for spec in sorted(specs, key=lambda sp: sp.mode == "shadow"):
        series = s.get(SeriesRow, spec.series_instance_uid)
        if series is None:
            raise CatalogError(f"unknown series {spec.series_instance_uid}")
        existing = s.scalars(select(JobRow).where(
            JobRow.series_instance_uid == spec.series_instance_uid,
            JobRow.model == spec.model,
            JobRow.generation == series.generation,
        )).first()
        if existing is not None:
            continue
        shadow = spec.mode == "shadow"
        # A shadow job is never dispatched: no destinations, so no delivery rows either.
        destinations = [] if shadow else list(spec.destinations)
        job = JobRow(
            series_instance_uid=spec.series_instance_uid,
            study_instance_uid=series.study_instance_uid,
            modality=series.modality,
            rule=spec.rule,
            model=spec.model,
            priority=spec.priority,
            destinations_json=json.dumps(destinations),
            generation=series.generation,
            state=JobState.RECEIVED.value,
            created_at=now,
            updated_at=now,
            mode="shadow" if shadow else "live",
        )
        s.add(job)
        s.flush()
        event = f"rule {spec.rule}" + (" (shadow: results kept in the node, never sent)" if shadow else "")
        event += f"; {detail}" if detail else ""
        s.add(JobEventRow(job_id=job.id, state=JobState.RECEIVED.value, at=now, detail=event))
        for dest in destinations:
            s.add(DeliveryRow(job_id=job.id, destination=dest))
        ids.append(job.id)
    return ids


_OWNER_OF_INSTANCE = (
    select(SeriesRow.study_instance_uid, InstanceRow.series_instance_uid)
    .join(SeriesRow, SeriesRow.series_instance_uid == InstanceRow.series_instance_uid)
    .where(InstanceRow.sop_instance_uid == bindparam("sop"))
)


class Catalog:
    """All database access of the node and its workers goes through this class."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            upgrade_schema(url, engine=self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- ingest -----------------------------------------------------------------------------

    def record_instances(self, instances: Sequence[StoredInstance], *, late_policy: str = "reprocess",
                         opened: Mapping[str, int] | None = None,
                         premature: list[tuple[str, str]] | None = None,
                         already_stored: dict[str, int] | None = None) -> list[str]:
        """Record stored instances (one transaction for the batch).

        A re-sent instance (same SOP Instance UID) updates its row (the new file replaces the
        old one) without counting twice, re-opening nothing; ``already_stored`` (if given) gets
        the count of such instances per series UID once the transaction committed.  A
        new instance for a series already complete re-opens it as a new generation when
        ``late_policy`` is ``"reprocess"``.  Returns the series UIDs re-opened that way.

        ``opened`` counts, per series, the associations first seen carrying it in this batch
        (``series.open_associations``).  A new instance after an association that carried its
        series was released marks the series as continued (split by its sender); after the
        series was completed at release (:data:`EARLY_REASONS`) it is a premature completion:
        its sender history row says so and ``(series UID, calling AE title)`` is appended to
        ``premature``.
        """
        reopened: list[str] = []
        if not instances:
            return reopened
        early: list[tuple[str, str]] = []
        with self.session() as s:
            # One query for the instances already known (a re-send), not one per instance.
            existing_rows: dict[str, InstanceRow] = {}
            uids = list({i.sop_instance_uid for i in instances})
            for start in range(0, len(uids), 500):
                chunk = uids[start:start + 500]
                existing_rows.update(
                    (row.sop_instance_uid, row)
                    for row in s.scalars(select(InstanceRow).where(InstanceRow.sop_instance_uid.in_(chunk)))
                )
            series_rows: dict[str, SeriesRow] = {}
            again_counts: dict[str, int] = {}
            # New instances go in as one multi-row INSERT, not one ORM object each: 46 instead of
            # 74 us of CPU per instance in batches of 50.
            new_rows: dict[str, dict[str, object]] = {}
            for inst in instances:
                series = series_rows.get(inst.series_instance_uid) or s.get(SeriesRow, inst.series_instance_uid)
                attrs = inst.attributes
                if series is None:
                    expected = expected_instances(attrs)
                    series = SeriesRow(
                        series_instance_uid=inst.series_instance_uid,
                        study_instance_uid=inst.study_instance_uid,
                        modality=_attr_str(attrs.get("Modality"), 16),
                        body_part_examined=_attr_str(attrs.get("BodyPartExamined"), 64),
                        series_description=_attr_str(attrs.get("SeriesDescription"), 128),
                        protocol_name=_attr_str(attrs.get("ProtocolName"), 128),
                        sop_class_uid=inst.sop_class_uid,
                        slice_thickness=_attr_float(attrs.get("SliceThickness")),
                        manufacturer=_attr_str(attrs.get("Manufacturer"), 128),
                        routing_json=routing_json(attrs),
                        study_date=study_date(attrs),
                        calling_ae_title=inst.calling_ae_title,
                        instance_count=0,
                        expected_count=expected,
                        bytes_received=0,
                        first_received_at=inst.received_at,
                        last_received_at=inst.received_at,
                        state=SeriesState.RECEIVING.value,
                        generation=1,
                    )
                    s.add(series)
                    s.flush()
                if inst.series_instance_uid not in series_rows and opened:
                    series.open_associations = (series.open_associations or 0) + opened.get(
                        inst.series_instance_uid, 0)
                series_rows[inst.series_instance_uid] = series
                existing = existing_rows.get(inst.sop_instance_uid)
                if existing is not None and existing.series_instance_uid != inst.series_instance_uid:
                    # The listener refuses these; a file found by reconciliation may still be
                    # one.  Never re-point another series' instance at this file.
                    log.warning("duplicate_sop_instance_ignored", sop_instance_uid=inst.sop_instance_uid,
                                series_instance_uid=inst.series_instance_uid,
                                stored_series_instance_uid=existing.series_instance_uid)
                    continue
                if existing is not None:
                    again_counts[inst.series_instance_uid] = again_counts.get(inst.series_instance_uid, 0) + 1
                    existing.path = str(inst.path)
                    existing.size = inst.size
                    existing.transfer_syntax_uid = inst.transfer_syntax_uid
                    existing.received_at = inst.received_at
                    continue
                again = new_rows.get(inst.sop_instance_uid)
                if again is not None:  # the same instance twice in a batch
                    again.update(path=str(inst.path), size=inst.size,
                                 transfer_syntax_uid=inst.transfer_syntax_uid, received_at=inst.received_at)
                    continue
                new_rows[inst.sop_instance_uid] = {
                    "sop_instance_uid": inst.sop_instance_uid,
                    "series_instance_uid": inst.series_instance_uid,
                    "sop_class_uid": inst.sop_class_uid,
                    "transfer_syntax_uid": inst.transfer_syntax_uid,
                    "path": str(inst.path),
                    "size": inst.size,
                    "received_at": inst.received_at,
                    "calling_ae_title": inst.calling_ae_title,
                    "instance_number": _attr_int(attrs.get("InstanceNumber")),
                }
                series.instance_count += 1
                series.bytes_received += inst.size
                series.last_received_at = max(series.last_received_at, inst.received_at)
                if series.released_at is not None or series.state == SeriesState.COMPLETE.value:
                    # An association that carried the series ended, and it goes on.
                    series.continued = (series.continued or 0) + 1
                    series.released_at = None
                    if series.state == SeriesState.COMPLETE.value:
                        history = s.get(SenderHistoryRow, series.series_instance_uid)
                        if history is not None:
                            history.split = 1
                            if series.completion_reason in EARLY_REASONS and not history.premature:
                                history.premature = 1
                                early.append((series.series_instance_uid, series.calling_ae_title or ""))
                if series.state == SeriesState.COMPLETE.value:
                    if late_policy == "reprocess":
                        series.state = SeriesState.RECEIVING.value
                        series.generation += 1
                        series.completed_at = None
                        series.completion_reason = None
                        series.released_at = None
                        reopened.append(series.series_instance_uid)
                    else:
                        series.note = "late instance ignored (completion.late_instances = ignore)"
            if new_rows:
                s.flush()  # the series rows first (foreign key)
                s.execute(insert(InstanceRow), list(new_rows.values()))
        if already_stored is not None:
            for uid, n in again_counts.items():
                already_stored[uid] = already_stored.get(uid, 0) + n
        for uid, ae in early:
            log.warning("premature_completion", series_instance_uid=uid, calling_ae_title=ae,
                        action="sender back to the idle timer; series reprocessed"
                        if late_policy == "reprocess" else "sender back to the idle timer")
        if premature is not None:
            premature.extend(early)
        return reopened

    def record_association(self, summary: AssociationSummary, closed: Iterable[str] = ()) -> None:
        """Remember that an association delivering these series has ended (completion hint).

        ``closed``: the series whose ``open_associations`` counted this association (released
        or aborted); only a release sets ``released_at``.
        """
        closed = set(closed)
        with self.session() as s:
            for uid in closed | (set(summary.series_instance_uids) if summary.released else set()):
                series = s.get(SeriesRow, uid)
                if series is None:
                    continue
                if uid in closed:
                    series.open_associations = max(0, (series.open_associations or 0) - 1)
                if summary.released and uid in summary.series_instance_uids:
                    series.released_at = summary.ended_at

    def owner_of_instance(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """(StudyInstanceUID, SeriesInstanceUID) the instance is stored in, or None."""
        # Asked once per C-STORE: Core on a pooled connection, no ORM session (5x cheaper).
        with self.engine.connect() as conn:
            row = conn.execute(_OWNER_OF_INSTANCE, {"sop": sop_instance_uid}).first()
        return (row[0], row[1]) if row is not None else None

    def known_sop_instance_uids(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(InstanceRow.sop_instance_uid)))

    # -- series -----------------------------------------------------------------------------

    def restart_idle_clocks(self, now: float) -> int:
        """Count the idle time of every series still receiving from ``now`` (at start-up).

        While the node was down no sender could reach it: a series cut off by the crash must
        not complete (half) before its sender had a chance to send the rest.
        """
        with self.session() as s:
            rows = s.scalars(select(SeriesRow).where(SeriesRow.state == SeriesState.RECEIVING.value)).all()
            for row in rows:
                row.last_received_at = max(row.last_received_at, now)
                row.released_at = None
                row.open_associations = 0  # no association outlives the process
            return len(rows)

    def due_series(
        self, now: float, idle_seconds: float,
        expected_for: Callable[[SeriesRow], int | None] | None = None,
    ) -> list[SeriesRow]:
        """Series still receiving that are complete now.

        Complete means idle for ``idle_seconds``, or the association that sent them was
        released and the instance count reached the expected count: the series' own (see
        :func:`expected_instances`), else ``expected_for(row)`` (a routing rule's).
        """
        with self.session() as s:
            rows = s.scalars(select(SeriesRow).where(SeriesRow.state == SeriesState.RECEIVING.value)).all()
            due = []
            for row in rows:
                if row.last_received_at + idle_seconds <= now:
                    due.append(row)
                elif row.released_at is not None and row.released_at >= row.last_received_at:
                    expected = row.expected_count
                    if expected is None and expected_for is not None:
                        expected = expected_for(row)
                    if expected is not None and row.instance_count >= expected:
                        due.append(row)
            return due

    def mark_series_complete(self, uid: str, reason: str, note: str | None = None) -> SeriesRow:
        with self.session() as s:
            row = s.get(SeriesRow, uid)
            if row is None:
                raise CatalogError(f"unknown series {uid}")
            row.state = SeriesState.COMPLETE.value
            row.completed_at = time.time()
            row.completion_reason = reason
            if note is not None:
                row.note = note
            return row

    def get_series(self, uid: str) -> SeriesRow | None:
        with self.session() as s:
            return s.get(SeriesRow, uid)

    def list_series(self, limit: int = 100) -> list[SeriesRow]:
        with self.session() as s:
            return list(s.scalars(select(SeriesRow).order_by(SeriesRow.last_received_at.desc()).limit(limit)))

    def series_of_study(self, study_instance_uid: str) -> list[SeriesRow]:
        with self.session() as s:
            return list(s.scalars(select(SeriesRow).where(SeriesRow.study_instance_uid == study_instance_uid)
                                  .order_by(SeriesRow.first_received_at)))

    def series_paths(self, uid: str) -> list[Path]:
        with self.session() as s:
            return [Path(p) for p in s.scalars(
                select(InstanceRow.path).where(InstanceRow.series_instance_uid == uid).order_by(InstanceRow.path)
            )]

    def delete_series(self, uid: str) -> None:
        with self.session() as s:
            for job_id in s.scalars(select(JobRow.id).where(JobRow.series_instance_uid == uid)):
                s.query(JobEventRow).filter(JobEventRow.job_id == job_id).delete()
                s.query(DeliveryRow).filter(DeliveryRow.job_id == job_id).delete()
                s.query(CommitmentRow).filter(CommitmentRow.job_id == job_id).delete()
            s.query(JobRow).filter(JobRow.series_instance_uid == uid).delete()
            s.query(InstanceRow).filter(InstanceRow.series_instance_uid == uid).delete()
            s.query(SeriesRow).filter(SeriesRow.series_instance_uid == uid).delete()

    # -- jobs -------------------------------------------------------------------------------

    def create_jobs(self, specs: Iterable[JobSpec], *, detail: str | None = None) -> list[int]:
        """Create one job per (series, model, generation) in state ``received`` and return the
        new ids; a job that already exists for the same key is not duplicated (nor returned).
        ``detail`` is added to each job's first event (e.g. the operator action that made it)."""
        with self.session() as s:
            return add_jobs(s, specs, time.time(), detail)

    def new_generation(self, series_instance_uid: str, specs: Sequence[JobSpec], *, detail: str) -> list[int]:
        """Start a new generation of a complete series with jobs for ``specs`` (one transaction).

        ``detail`` names the operator action; it is the first event of every new job (the audit
        trail).  Raises :class:`CatalogError` for an unknown series, one still receiving, or no
        specs.
        """
        if not specs:
            raise CatalogError(f"no model to run on series {series_instance_uid}")
        with self.session() as s:
            series = s.get(SeriesRow, series_instance_uid, with_for_update=True)
            if series is None:
                raise CatalogError(f"unknown series {series_instance_uid}")
            if series.state != SeriesState.COMPLETE.value:
                raise CatalogError(f"series {series_instance_uid} is still receiving; it runs when complete")
            series.generation += 1
            series.note = None
            s.flush()
            return add_jobs(s, specs, time.time(), detail)

    def transition(self, job_id: int, state: JobState, *, reason: str | None = None,
                   expect: Sequence[JobState] | None = None, count_attempt: bool = False,
                   reset_attempts: bool = False) -> JobRow:
        """Move a job to ``state`` (timestamped, with an event row).

        ``expect`` guards against races (e.g. a redelivered task for a job that was cancelled):
        if the current state is not in it, :class:`CatalogError` is raised and nothing changes.
        ``reset_attempts`` sets the inference attempt count back to 0 (an operator's retry).
        """
        now = time.time()
        with self.session() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
            if job is None:
                raise CatalogError(f"unknown job {job_id}")
            current = JobState(job.state)
            if expect is not None and current not in expect:
                raise CatalogError(f"job {job_id} is {current.value}, expected {'/'.join(e.value for e in expect)}")
            if state not in _TRANSITIONS[current]:
                raise CatalogError(f"job {job_id} cannot go from {current.value} to {state.value}")
            job.state = state.value
            job.updated_at = now
            if state in (JobState.FAILED,):
                job.reason = reason
            elif state in (JobState.QUEUED, JobState.DONE):
                job.reason = reason
            if reset_attempts:
                job.attempts = 0
            if count_attempt:
                job.attempts += 1
            stamp = f"{state.value}_at"
            if hasattr(job, stamp):
                setattr(job, stamp, now)
            s.add(JobEventRow(job_id=job_id, state=state.value, at=now, detail=reason))
            return job

    def set_results(self, job_id: int, results: dict[str, Any]) -> None:
        with self.session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise CatalogError(f"unknown job {job_id}")
            job.results_json = json.dumps(results)

    def get_job(self, job_id: int) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def list_jobs(self, state: str | None = None, limit: int = 200) -> list[JobRow]:
        with self.session() as s:
            q = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            if state:
                q = q.where(JobRow.state == state)
            return list(s.scalars(q))

    def next_queued_job(self, models: Collection[str], exclude: Collection[int] = ()) -> JobRow | None:
        """The queued job for one of ``models`` a worker gets next in the broker's order (urgent
        first, then the oldest ``queued_at``, then the lowest id), skipping ``exclude``."""
        if not models:
            return None
        with self.session() as s:
            q = (
                select(JobRow)
                .where(JobRow.state == JobState.QUEUED.value, JobRow.model.in_(list(models)))
                .order_by(
                    case((JobRow.priority == "urgent", 0), else_=1),
                    func.coalesce(JobRow.queued_at, JobRow.updated_at),
                    JobRow.id,
                )
                .limit(1)
            )
            if exclude:
                q = q.where(JobRow.id.not_in(list(exclude)))
            return s.scalars(q).first()

    def job_events(self, job_id: int) -> list[JobEventRow]:
        with self.session() as s:
            return list(s.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)))

    def unfinished_jobs(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.state.in_([st.value for st in UNFINISHED]))))

    def count_jobs_by_state(self) -> dict[str, int]:
        with self.session() as s:
            return {st: n for st, n in s.execute(select(JobRow.state, func.count()).group_by(JobRow.state))}

    def queue_depth(self) -> dict[tuple[str, str], tuple[int, float]]:
        """Jobs waiting per (queue, priority): their count and the oldest ``updated_at``."""
        with self.session() as s:
            rows = s.execute(
                select(JobRow.state, JobRow.priority, func.count(), func.min(JobRow.updated_at))
                .where(JobRow.state.in_(list(QUEUE_OF_STATE)))
                .group_by(JobRow.state, JobRow.priority)
            )
            return {(QUEUE_OF_STATE[st], pr): (n, first) for st, pr, n, first in rows}

    # -- deliveries -------------------------------------------------------------------------

    def deliveries(self, job_id: int) -> list[DeliveryRow]:
        with self.session() as s:
            return list(s.scalars(select(DeliveryRow).where(DeliveryRow.job_id == job_id).order_by(DeliveryRow.id)))

    def record_delivery(self, job_id: int, destination: str, *, ok: bool, error: str | None = None,
                        objects: Sequence[Mapping[str, Any]] | None = None,
                        commitment: CommitmentRow | None = None) -> DeliveryRow:
        """Record one delivery attempt; ``objects`` are its per-object outcomes, when known.

        ``commitment`` (a new Storage Commitment transaction) is written in the same database
        transaction, so a delivery marked done always has the transaction that proves it.
        """
        now = time.time()
        with self.session() as s:
            # A transaction of an earlier attempt still open here (the attempt was repeated by
            # a path that did not supersede it) must not confirm this one's objects.
            self._supersede_commitments(s, job_id, [destination], now, "a new delivery attempt was recorded")
            if commitment is not None:
                s.add(commitment)
            row = s.scalars(select(DeliveryRow).where(
                DeliveryRow.job_id == job_id, DeliveryRow.destination == destination)).first()
            if row is None:
                row = DeliveryRow(job_id=job_id, destination=destination, attempts=0)
                s.add(row)
            row.attempts = (row.attempts or 0) + 1
            row.last_attempt_at = now
            row.next_attempt_at = None
            if objects is not None:
                row.objects_json = json.dumps([dict(o) for o in objects])
            if ok:
                row.state = "done"
                row.done_at = now
            else:
                row.state = "failed"
                row.last_error = error
            return row

    def schedule_delivery_retry(self, job_id: int, at: float) -> None:
        """Record when the deliveries of the job not yet done are tried again (``at``, epoch s):
        the dashboard's "next attempt at"."""
        with self.session() as s:
            for row in s.scalars(select(DeliveryRow).where(DeliveryRow.job_id == job_id,
                                                           DeliveryRow.state != "done")):
                row.next_attempt_at = at

    # -- destination findings ---------------------------------------------------------------

    def record_destination_finding(self, destination: str, kind: str, detail: str, *,
                                   job_id: int | None = None) -> bool:
        """Remember ``kind`` about ``destination``; True only the first time (warn once).

        The job (when given) gets an event with ``detail``, the first time only.
        """
        now = time.time()
        with self.session() as s:
            if s.get(DestinationFindingRow, (destination, kind)) is not None:
                return False
            s.add(DestinationFindingRow(destination=destination, kind=kind, detail=detail, job_id=job_id,
                                        found_at=now))
            if job_id is not None:
                job = s.get(JobRow, job_id)
                if job is not None:
                    s.add(JobEventRow(job_id=job_id, state=job.state, at=now, detail=detail))
            return True

    def clear_destination_finding(self, destination: str, kind: str) -> bool:
        """Forget ``kind`` about ``destination`` (seen to be fixed); True if it was known."""
        with self.session() as s:
            row = s.get(DestinationFindingRow, (destination, kind))
            if row is None:
                return False
            s.delete(row)
            return True

    def destination_findings(self) -> list[DestinationFindingRow]:
        """Every finding, by destination then kind."""
        with self.session() as s:
            return list(s.scalars(select(DestinationFindingRow).order_by(
                DestinationFindingRow.destination, DestinationFindingRow.kind)))

    def reopen_deliveries(self, job_id: int, destinations: Sequence[str] | None, *, reason: str) -> JobRow:
        """Make a ``done`` or ``failed`` job with encoded results deliver them again.

        Every delivery of ``destinations`` (default: all the job's destinations) goes back to
        ``pending``, a destination the job did not have is added, and the job returns to
        ``encoded`` with ``reason`` as its event.  The caller sends it to the dispatch queue.
        """
        now = time.time()
        with self.session() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
            if job is None:
                raise CatalogError(f"unknown job {job_id}")
            if job.state not in (JobState.DONE.value, JobState.FAILED.value) or not job.encoded_at \
                    or not job.results.get("files"):
                raise CatalogError(f"job {job_id} is {job.state} and has no stored results to send again"
                                   + ("" if job.state in (JobState.DONE.value, JobState.FAILED.value)
                                      else " yet (it is still being processed)"))
            wanted = list(destinations) if destinations else job.destinations
            # First, so a late report of the attempt being repeated finds its transaction
            # closed (the commitment loop's compare-and-set fails) and never touches the new one.
            superseded = self._supersede_commitments(s, job_id, wanted, now, reason, add_events=False)
            current = job.destinations
            if any(d not in current for d in wanted):
                job.destinations_json = json.dumps(current + [d for d in wanted if d not in current])
            rows = {r.destination: r for r in s.scalars(select(DeliveryRow).where(DeliveryRow.job_id == job_id))}
            for dest in wanted:
                row = rows.get(dest)
                if row is None:
                    s.add(DeliveryRow(job_id=job_id, destination=dest, state="pending", attempts=0))
                else:
                    row.state = "pending"
                    row.attempts = 0
                    row.last_error = None
                    row.next_attempt_at = None
            job.state = JobState.ENCODED.value
            job.updated_at = now
            job.encoded_at = now
            job.reason = None
            s.add(JobEventRow(job_id=job_id, state=JobState.ENCODED.value, at=now, detail=reason))
            for detail in superseded:
                s.add(JobEventRow(job_id=job_id, state=JobState.ENCODED.value, at=now, detail=detail))
            return job

    def _supersede_commitments(self, s: Session, job_id: int, destinations: Sequence[str], now: float,
                               why: str, *, add_events: bool = True) -> list[str]:
        """Close, unapplied, the open Storage Commitment transactions of the job's deliveries to
        ``destinations``: the delivery they prove is being repeated.  One job event per
        destination (added here with ``add_events``, else returned for the caller to add after its
        own); a report that still comes for them is kept out (``record_report`` answers
        ``superseded``)."""
        if not destinations:
            return []
        open_rows = list(s.scalars(
            select(CommitmentRow).where(CommitmentRow.job_id == job_id,
                                        CommitmentRow.destination.in_(list(destinations)),
                                        CommitmentRow.state.in_(COMMITMENT_OPEN))
            .order_by(CommitmentRow.requested_at).with_for_update()))
        if not open_rows:
            return []
        s.execute(update(CommitmentRow)
                  .where(CommitmentRow.transaction_uid.in_([r.transaction_uid for r in open_rows]),
                         CommitmentRow.state.in_(COMMITMENT_OPEN))
                  .values(state=COMMITMENT_SUPERSEDED, closed_at=now)
                  .execution_options(synchronize_session=False))
        details = []
        for dest in dict.fromkeys(r.destination for r in open_rows):
            uids = [r.transaction_uid for r in open_rows if r.destination == dest]
            details.append(f"storage commitment of the previous delivery to {dest} superseded ({why}): "
                           f"a late report for transaction {', '.join(uids)} will not be applied")
            log.info("commitment_superseded", job_id=job_id, destination=dest, transaction_uids=uids, why=why)
        if add_events:
            job = s.get(JobRow, job_id)
            for detail in details:
                s.add(JobEventRow(job_id=job_id, state=job.state if job else JobState.ENCODED.value, at=now,
                                  detail=detail))
        return details

    def reset_deliveries(self, job_id: int, *, include_done: bool = False, reset_attempts: bool = False) -> None:
        """Make every delivery of the job not yet done (with ``include_done``, every one) ``pending``
        again; with ``reset_attempts`` (an operator's retry) its attempt count starts again from 0."""
        with self.session() as s:
            q = select(DeliveryRow).where(DeliveryRow.job_id == job_id)
            if not include_done:
                q = q.where(DeliveryRow.state != "done")
            rows = list(s.scalars(q))
            if include_done:
                self._supersede_commitments(s, job_id, [r.destination for r in rows if r.state == "done"],
                                            time.time(), "the job runs again")
            for row in rows:
                row.state = "pending"
                row.next_attempt_at = None
                if reset_attempts:
                    row.attempts = 0
