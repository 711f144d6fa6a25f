"""The catalog: the node's source of truth (series, instances, jobs, deliveries, heartbeats).

``tables`` holds the ORM tables and the job-state transition table, ``store`` the
:class:`Catalog` with every query, ``recorder`` the ingest sink that writes received instances
in batches, ``heartbeats`` the worker liveness queries, ``schema`` and ``migrations`` the
Alembic-managed schema, ``queries`` the read-only questions of the dashboard, API, metrics
and retention.  Other packages import from here; no other package speaks SQL.
"""

from sqlalchemy.exc import SQLAlchemyError as DatabaseError

from dicom_node.catalog import commitments, queries, shadow
from dicom_node.catalog.store import Catalog, JobSpec, expected_instances
from dicom_node.catalog.tables import (
    KEEPS_FIRST_INSTANCE,
    QUEUE_OF_STATE,
    UNFINISHED,
    Base,
    CatalogError,
    DeliveryRow,
    DestinationFindingRow,
    InstanceRow,
    JobEventRow,
    JobRow,
    JobState,
    SeriesRow,
    SeriesState,
    WorkerHeartbeatRow,
)

__all__ = [
    "KEEPS_FIRST_INSTANCE",
    "QUEUE_OF_STATE",
    "UNFINISHED",
    "Base",
    "Catalog",
    "CatalogError",
    "DatabaseError",
    "DeliveryRow",
    "DestinationFindingRow",
    "InstanceRow",
    "JobEventRow",
    "JobRow",
    "JobSpec",
    "JobState",
    "SeriesRow",
    "SeriesState",
    "WorkerHeartbeatRow",
    "commitments",
    "expected_instances",
    "queries",
    "shadow",
]
