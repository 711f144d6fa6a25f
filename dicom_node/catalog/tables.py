"""The catalog's tables (SQLAlchemy ORM) and the job states with their allowed transitions."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from sqlalchemy import (
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dicom_node.errors import DicomNodeError


class JobState(str, Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    ENCODED = "encoded"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Which state may follow which.  ``queued`` is reachable again from every unfinished state
#: (reconciliation after a crash, retry of a failed job); ``encoded`` again from ``done`` and
#: ``failed`` (the stored results are delivered again: ``dicom-node resend``).
_TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.RECEIVED: {JobState.QUEUED, JobState.FAILED, JobState.CANCELLED},
    JobState.QUEUED: {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.FAILED, JobState.CANCELLED},
    # encoded -> done: a shadow job, whose results are kept and never delivered.
    JobState.ENCODED: {JobState.QUEUED, JobState.ENCODED, JobState.DELIVERING, JobState.DONE, JobState.FAILED,
                       JobState.CANCELLED},
    JobState.DELIVERING: {JobState.QUEUED, JobState.DELIVERING, JobState.ENCODED, JobState.DONE,
                          JobState.FAILED, JobState.CANCELLED},
    JobState.DONE: {JobState.QUEUED, JobState.ENCODED},
    JobState.FAILED: {JobState.QUEUED, JobState.ENCODED},
    JobState.CANCELLED: {JobState.QUEUED},
}
#: Queue a job in this state is waiting in.
QUEUE_OF_STATE = {JobState.QUEUED.value: "inference", JobState.ENCODED.value: "dispatch"}
UNFINISHED = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.DELIVERING)


class SeriesState(str, Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class CatalogError(DicomNodeError):
    """A catalog operation that cannot be done (unknown job, illegal transition)."""


class Base(DeclarativeBase):
    pass


class SeriesRow(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(128))
    protocol_name: Mapped[str | None] = mapped_column(String(128))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    manufacturer: Mapped[str | None] = mapped_column(String(128))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_count: Mapped[int | None] = mapped_column(Integer)
    bytes_received: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    released_at: Mapped[float | None] = mapped_column(Float)
    #: Associations that carried instances of this series and have not ended yet (a series does
    #: not complete by the idle timer while one is open, up to ``completion.max_open_seconds``).
    open_associations: Mapped[int] = mapped_column(Integer, server_default="0")
    #: How often an instance arrived after an association that carried the series was released
    #: (the sender split the series over several associations).
    continued: Mapped[int] = mapped_column(Integer, server_default="0")
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING.value, index=True)
    completed_at: Mapped[float | None] = mapped_column(Float)
    completion_reason: Mapped[str | None] = mapped_column(String(32))
    #: Incremented when instances arrive after the series was processed (late instances).
    generation: Mapped[int] = mapped_column(Integer, default=1)
    note: Mapped[str | None] = mapped_column(Text)
    #: The series' routing attributes (``dicom_node.attributes.ROUTING_KEYWORDS``) as JSON, from
    #: its first instance; NULL for series recorded before they were kept.
    routing_json: Mapped[str | None] = mapped_column(Text)
    #: StudyDate (DA, ``YYYYMMDD``) of the first instance, for people to recognise the study
    #: (revision 0008_admin); NULL before it was kept or when the header has none.
    study_date: Mapped[str | None] = mapped_column(String(8))

    def routing_attributes(self) -> dict[str, Any]:
        """The attributes routing rules may match on, by DICOM keyword."""
        derived = {
            "SOPClassUID": self.sop_class_uid,
            "CallingAETitle": self.calling_ae_title,
            "InstanceCount": self.instance_count,
        }
        if self.routing_json is not None:
            return {**json.loads(self.routing_json), **derived}
        return {
            "Modality": self.modality,
            "BodyPartExamined": self.body_part_examined,
            "SeriesDescription": self.series_description,
            "ProtocolName": self.protocol_name,
            "SOPClassUID": self.sop_class_uid,
            "SliceThickness": self.slice_thickness,
            "Manufacturer": self.manufacturer,
            "CallingAETitle": self.calling_ae_title,
            "InstanceCount": self.instance_count,
        }


class SenderHistoryRow(Base):
    """One completed series of a sender, for learning whether it splits series over associations.

    Kept per (calling AE title, rule) to the newest ``completion.history_size`` series.
    """

    __tablename__ = "sender_history"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    #: The first routing rule the series matched ("" when none).
    rule: Mapped[str] = mapped_column(String(128), default="")
    #: 1 when the series continued in a later association after one that carried it ended.
    split: Mapped[int] = mapped_column(Integer, default=0)
    #: 1 when the series was completed at its association's release and more instances came.
    premature: Mapped[int] = mapped_column(Integer, default=0)
    completion_reason: Mapped[str] = mapped_column(String(32), default="")
    completed_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_sender_history_sender", "calling_ae_title", "rule", "completed_at"),)


class InstanceRow(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    instance_number: Mapped[int | None] = mapped_column(Integer)


class JobRow(Base):
    __tablename__ = "jobs"
    # sqlite_autoincrement: a job id is never given twice, even after gc removed every job
    # (revision 0007); PostgreSQL's sequence never goes back anyway.
    __table_args__ = (UniqueConstraint("series_instance_uid", "model", "generation", name="uq_job_series_model_gen"),
                      {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    destinations_json: Mapped[str] = mapped_column(Text, default="[]")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    queued_at: Mapped[float | None] = mapped_column(Float)
    running_at: Mapped[float | None] = mapped_column(Float)
    encoded_at: Mapped[float | None] = mapped_column(Float)
    delivering_at: Mapped[float | None] = mapped_column(Float)
    done_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    results_json: Mapped[str] = mapped_column(Text, default="{}")
    #: ``live`` or ``shadow`` (revision 0008): a shadow job's results stay in the outbox, it has
    #: no destinations and no delivery rows, and it ends ``done`` straight from ``encoded``.
    mode: Mapped[str] = mapped_column(String(8), default="live", server_default="live")

    @property
    def shadow(self) -> bool:
        """True for a shadow job (results kept in the node, never dispatched)."""
        return self.mode == "shadow"

    @property
    def state_label(self) -> str:
        """The state as operators see it: ``done (shadow)`` for a finished shadow job, so it
        never reads like a delivered result."""
        return f"{self.state} (shadow)" if self.shadow else self.state

    @property
    def destinations(self) -> list[str]:
        return list(json.loads(self.destinations_json))

    @property
    def results(self) -> dict[str, Any]:
        return dict(json.loads(self.results_json))


class JobEventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    at: Mapped[float] = mapped_column(Float)
    detail: Mapped[str | None] = mapped_column(Text)


class DeliveryRow(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_delivery_job_dest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[float | None] = mapped_column(Float)
    done_at: Mapped[float | None] = mapped_column(Float)
    #: Per-object outcomes of the last attempt as a JSON list (``InstanceResult.record``): SOP
    #: instance UID, class name, ``sent``/``refused``/``confirmed``/``unconfirmed``, detail.
    objects_json: Mapped[str | None] = mapped_column(Text)
    #: When the worker tries this delivery again after a transient failure (the retry's
    #: countdown); NULL when no attempt is scheduled.
    next_attempt_at: Mapped[float | None] = mapped_column(Float)

    @property
    def objects(self) -> list[dict[str, Any]]:
        """The per-object outcomes (empty for deliveries recorded before revision 0005)."""
        return list(json.loads(self.objects_json)) if self.objects_json else []

    @property
    def confirmation(self) -> str | None:
        """``confirmed`` / ``unconfirmed`` once a C-FIND or storage commitment verified the delivery
        (``unconfirmed`` when any object is), else ``None``."""
        outcomes = {o.get("outcome") for o in self.objects}
        if "unconfirmed" in outcomes:
            return "unconfirmed"
        return "confirmed" if "confirmed" in outcomes else None


#: ``DestinationFindingRow.kind`` of an archive that keeps the first object of a SOP Instance UID.
KEEPS_FIRST_INSTANCE = "keeps_first_instance"


class DestinationFindingRow(Base):
    """Something learned once about a destination (``kind``), kept until it is seen to be gone.

    ``keeps_first_instance``: the archive still held an earlier object after a re-run sent a
    new one with the same SOP Instance UID (Orthanc ``OverwriteInstances`` false, dcm4chee-arc's
    duplicate policy).  Written by the worker that found it, read by ``serve`` (dashboard,
    ``/readyz``, ``/metrics``).
    """

    __tablename__ = "destination_findings"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: One sentence for the operator, with the fix.
    detail: Mapped[str] = mapped_column(Text)
    #: The job whose delivery showed it.
    job_id: Mapped[int | None] = mapped_column(Integer)
    found_at: Mapped[float] = mapped_column(Float)


#: States of a :class:`CommitmentRow` (named again in :mod:`dicom_node.catalog.commitments`).
COMMITMENT_REQUESTED = "requested"
COMMITMENT_REPORTED = "reported"
COMMITMENT_CLOSED = "closed"
#: State of a transaction whose delivery was started again (``resend``, a retry of a done job)
#: before it closed: its report, if it still comes, is never applied.
COMMITMENT_SUPERSEDED = "superseded"
#: States of a transaction still waiting for its report or for the report to be applied.
COMMITMENT_OPEN = (COMMITMENT_REQUESTED, COMMITMENT_REPORTED)


class CommitmentRow(Base):
    """One Storage Commitment transaction (revision 0009_commitment).

    ``state``: ``requested`` (written with the delivery, before the N-ACTION; ``requests``
    counts the N-ACTIONs sent, ``requested_at`` is the last one), ``reported`` (the archive's
    N-EVENT-REPORT is in ``report_json``, not applied yet), ``closed`` (applied to the
    delivery's objects), ``superseded`` (closed unapplied: the delivery it proves was started
    again before its report was applied, so the report must not touch the new attempt's
    objects).  Every change is a compare-and-set on ``state`` (and ``requests``), so a report
    that comes twice, or from a request sent again, is applied once, and one that comes for a
    superseded transaction never.
    """

    __tablename__ = "commitments"

    transaction_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: 0 for the first request; n for the n-th re-send of objects the archive reported failed.
    round: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    #: ``[{"sop_class_uid", "sop_instance_uid", "path"}]``: the objects asked for.
    objects_json: Mapped[str] = mapped_column(Text)
    #: When the C-STORE of these objects succeeded (start of the confirmation time).
    sent_at: Mapped[float] = mapped_column(Float)
    requested_at: Mapped[float] = mapped_column(Float)
    #: ``{"committed": [uid...], "failed": {uid: reason}}`` from the N-EVENT-REPORT.
    report_json: Mapped[str | None] = mapped_column(Text)
    reported_at: Mapped[float | None] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float)
    #: Why the last N-ACTION could not be sent (association refused...), for the operator.
    last_error: Mapped[str | None] = mapped_column(Text)

    @property
    def objects(self) -> list[dict[str, str]]:
        return list(json.loads(self.objects_json))

    @property
    def report(self) -> dict[str, Any]:
        return dict(json.loads(self.report_json)) if self.report_json else {}


class WorkerHeartbeatRow(Base):
    __tablename__ = "worker_heartbeats"

    #: Celery node name (``celery@gpu-01``), the same for the main process and its pool children.
    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: Comma-separated queue names the worker consumes (``inference,dispatch``).
    queues: Mapped[str] = mapped_column(String(255), default="")
    #: ``cuda:0``, ``cpu`` once the process has resolved it, else the configured value (``auto``).
    device: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    current_job_id: Mapped[int | None] = mapped_column(Integer)
    current_model: Mapped[str | None] = mapped_column(String(128))
    current_since: Mapped[float | None] = mapped_column(Float)
    #: JSON list of the models the process holds in memory (``workers.heartbeat``): name,
    #: version, device, loaded_at, last_used, load_s, uses; least recently used first.
    warm_models_json: Mapped[str | None] = mapped_column(Text)

    @property
    def warm_models(self) -> list[dict[str, Any]]:
        """The decoded ``warm_models_json`` (empty when the process reported none)."""
        return list(json.loads(self.warm_models_json)) if self.warm_models_json else []


class DriftScannerRow(Base):
    """One scanner the drift monitor tracks (``dicom_node.drift``): a normalised (Manufacturer,
    ManufacturerModelName, StationName, protocol), or the ``other`` row that takes every scanner
    past ``drift.max_scanners`` so label cardinality stays bounded."""

    __tablename__ = "drift_scanners"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: Hash of the normalised identity (``"other"`` for the overflow row); unique.
    key: Mapped[str] = mapped_column(String(64), unique=True)
    #: Short stable name for metrics and the dashboard (``CT01-3fa9c2``); never patient data.
    label: Mapped[str] = mapped_column(String(40))
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    model_name: Mapped[str] = mapped_column(String(64), default="")
    station: Mapped[str] = mapped_column(String(16), default="")
    protocol: Mapped[str] = mapped_column(String(64), default="")
    first_seen: Mapped[float] = mapped_column(Float)
    #: Newest ``last_received_at`` of a series of this scanner that a job ran on.
    last_seen: Mapped[float] = mapped_column(Float)


class DriftObservationRow(Base):
    """What one job's model saw and said, for drift: input and output features as JSON
    (``{"input.kvp": 120, "input.kernel": "B30f", "output.findings": 2, ...}``).

    One row per (model, series): a re-run replaces it.  Kept after the series is collected;
    ``dicom_node.retention`` removes rows older than ``drift.retention_days`` except each
    pair's baseline.
    """

    __tablename__ = "drift_observations"
    __table_args__ = (
        UniqueConstraint("model", "series_instance_uid", name="uq_drift_model_series"),
        Index("ix_drift_pair", "model", "scanner_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128))
    scanner_id: Mapped[int] = mapped_column(Integer, ForeignKey("drift_scanners.id"))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    #: When the job's results were encoded (epoch s): the time axis of the windows.
    at: Mapped[float] = mapped_column(Float, index=True)
    features_json: Mapped[str] = mapped_column(Text, default="{}")

    @property
    def features(self) -> dict[str, Any]:
        return dict(json.loads(self.features_json))
