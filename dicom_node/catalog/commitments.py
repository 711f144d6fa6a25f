"""Storage Commitment transactions in the catalog: durable, and applied exactly once.

A transaction is written together with the delivery it proves (``Catalog.record_delivery``
with ``commitment=``), before its N-ACTION goes out.  From then on every change is a
compare-and-set, so the worker (a report on the N-ACTION's own association), the listener (a
report on a new association) and the node's commitment loop (time-outs, re-sends) can race,
and a node killed at any point can restart, without a report being lost or applied twice.
A delivery repeated before its transaction closed (``resend``) supersedes it
(``Catalog._supersede_commitments``): its report, however late, is never applied to the
repeated delivery's objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select, update

from dicom_node.catalog.store import Catalog
from dicom_node.catalog.tables import (
    COMMITMENT_CLOSED,
    COMMITMENT_OPEN,
    COMMITMENT_REPORTED,
    COMMITMENT_REQUESTED,
    COMMITMENT_SUPERSEDED,
    CommitmentRow,
    DeliveryRow,
)

REQUESTED = COMMITMENT_REQUESTED
REPORTED = COMMITMENT_REPORTED
CLOSED = COMMITMENT_CLOSED
#: Closed unapplied: its delivery was started again (``resend``) before its report was applied.
SUPERSEDED = COMMITMENT_SUPERSEDED


def new_row(job_id: int, destination: str, transaction_uid: str, objects: Sequence[Mapping[str, str]], *,
            sent_at: float, now: float, round: int = 0) -> CommitmentRow:
    """A transaction not requested yet (``requests`` 0) whose clock starts ``now``."""
    return CommitmentRow(
        transaction_uid=transaction_uid, job_id=job_id, destination=destination, state=REQUESTED,
        round=round, requests=0, objects_json=json.dumps([dict(o) for o in objects]),
        sent_at=sent_at, requested_at=now,
    )


def get(catalog: Catalog, transaction_uid: str) -> CommitmentRow | None:
    with catalog.session() as s:
        return s.get(CommitmentRow, transaction_uid)


def of_job(catalog: Catalog, job_id: int) -> list[CommitmentRow]:
    """Every transaction of a job, oldest first."""
    with catalog.session() as s:
        return list(s.scalars(select(CommitmentRow).where(CommitmentRow.job_id == job_id)
                              .order_by(CommitmentRow.round, CommitmentRow.requested_at)))


def open_transactions(catalog: Catalog) -> list[CommitmentRow]:
    """Transactions still waiting for a report, or whose report is not applied yet."""
    with catalog.session() as s:
        return list(s.scalars(select(CommitmentRow).where(CommitmentRow.state.in_(COMMITMENT_OPEN))
                              .order_by(CommitmentRow.requested_at)))


def claim_request(catalog: Catalog, row: CommitmentRow, now: float) -> bool:
    """Count one more N-ACTION for ``row`` (as read); False when someone else changed it first."""
    with catalog.session() as s:
        result = s.execute(
            update(CommitmentRow)
            .where(CommitmentRow.transaction_uid == row.transaction_uid, CommitmentRow.state == REQUESTED,
                   CommitmentRow.requests == row.requests)
            .values(requests=row.requests + 1, requested_at=now, last_error=None)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def request_failed(catalog: Catalog, transaction_uid: str, error: str) -> None:
    """Remember why the last N-ACTION could not be sent (it still counts as a request)."""
    with catalog.session() as s:
        s.execute(update(CommitmentRow).where(CommitmentRow.transaction_uid == transaction_uid)
                  .values(last_error=error))


def record_report(catalog: Catalog, transaction_uid: str, committed: Sequence[str],
                  failed: Mapping[str, str], now: float) -> str:
    """Keep an N-EVENT-REPORT: ``recorded``, ``unknown`` (no such transaction), ``duplicate``
    (already reported or closed: a second answer to a request sent again) or ``superseded``
    (the delivery it proves was started again: a late report of the earlier attempt, kept out
    so it cannot confirm or fail the new attempt's objects)."""
    report = json.dumps({"committed": list(committed), "failed": dict(failed)})
    with catalog.session() as s:
        result = s.execute(
            update(CommitmentRow)
            .where(CommitmentRow.transaction_uid == transaction_uid, CommitmentRow.state == REQUESTED)
            .values(state=REPORTED, report_json=report, reported_at=now)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return "recorded"
        current = s.get(CommitmentRow, transaction_uid)
        if current is None:
            return "unknown"
        return "superseded" if current.state == SUPERSEDED else "duplicate"


def close(catalog: Catalog, row: CommitmentRow, outcomes: Mapping[str, Mapping[str, Any]], now: float,
          follow_up: CommitmentRow | None = None) -> bool:
    """Close ``row`` (from the state it was read in) and write ``outcomes`` (SOP Instance UID ->
    fields of its per-object record) into its delivery, plus ``follow_up`` (the transaction of
    the objects sent again), all in one database transaction.  False: closed by someone else."""
    with catalog.session() as s:
        result = s.execute(
            update(CommitmentRow)
            .where(CommitmentRow.transaction_uid == row.transaction_uid, CommitmentRow.state == row.state,
                   CommitmentRow.requests == row.requests)
            .values(state=CLOSED, closed_at=now)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        delivery = s.scalars(select(DeliveryRow).where(DeliveryRow.job_id == row.job_id,
                                                       DeliveryRow.destination == row.destination)).first()
        if delivery is not None:
            objects = list(json.loads(delivery.objects_json or "[]"))
            for record in objects:
                change = outcomes.get(str(record.get("sop_instance_uid")))
                if change:
                    record.update(change)
            delivery.objects_json = json.dumps(objects)
        if follow_up is not None:
            s.add(follow_up)
        return True

