"""The boundary between the listener (which writes files) and the catalog (which records them).

The listener calls an :class:`IngestSink` after an instance is durably in the spool and when an
association ends; the sink records it (batched, off the association thread) and drives
completion.  Keeping this a small protocol lets the listener be tested without a database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dicom_node.attributes import HEADER_KEYWORDS

#: Non-identifying attributes copied from each instance into the catalog (routing, completion,
#: dashboard), declared in :mod:`dicom_node.attributes`.  No patient name, ID or birth date.
CATALOG_ATTRIBUTES: tuple[str, ...] = HEADER_KEYWORDS


@dataclass(frozen=True)
class StoredInstance:
    """One instance that is on disk (fsync'd) and must be processed."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    calling_ae_title: str
    association_id: str
    received_at: float
    #: Values of :data:`CATALOG_ATTRIBUTES` present in the dataset (strings, ints, floats).
    attributes: dict[str, str | int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class AssociationSummary:
    """What one association delivered, reported when it is released or aborted."""

    association_id: str
    calling_ae_title: str
    released: bool  # False when aborted or lost
    series_instance_uids: frozenset[str]
    ended_at: float


@dataclass(frozen=True)
class CommitmentReport:
    """A Storage Commitment N-EVENT-REPORT an archive sent to the listener (PS3.4 J.3.3)."""

    transaction_uid: str
    #: 1: every object committed; 2: some failed.
    event_type: int
    committed: tuple[str, ...]
    #: SOP Instance UID -> the archive's failure reason, readable.
    failed: dict[str, str]
    calling_ae_title: str
    received_at: float


class CommitmentSink(Protocol):
    """Optional side of a sink: keeps Storage Commitment reports durably before they are answered."""

    def commitment_reported(self, report: CommitmentReport) -> str:
        """Record ``report``; return ``recorded``, ``duplicate``, ``unknown`` (no such transaction)
        or ``superseded`` (its delivery was started again: the report is not applied)."""
        ...


class IngestSink(Protocol):
    """Receives listener events; implementations must be thread-safe and must not block long."""

    def instance_stored(self, instance: StoredInstance) -> None: ...

    def association_ended(self, summary: AssociationSummary) -> None: ...


class InstanceClaims(Protocol):
    """Optional side of a sink: who already holds a SOP Instance UID (duplicate check)."""

    def claim(self, study_instance_uid: str, series_instance_uid: str,
              sop_instance_uid: str) -> tuple[str, str] | None:
        """Register the instance as about to be stored in (study, series) and return None; or,
        when the UID is already stored (or being stored) in *another* study or series, leave
        everything as it is and return that (study, series)."""
        ...
