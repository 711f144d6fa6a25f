"""Storage Commitment transactions driven to an end: requested, reported, re-sent, closed.

The worker starts a transaction with the delivery (:func:`start_transaction`: written in the
catalog with the delivery, then the first N-ACTION).  The archive's report arrives on the
N-ACTION's association (the worker records it) or on a new association to the listener (the
recorder records it).  :class:`CommitmentLoop`, in ``serve``, does the rest from the catalog
alone, so it survives any crash:

- a reported transaction is applied once: committed objects become ``confirmed`` (with the
  confirmation time), failed ones are sent again (C-STORE, then a new transaction) up to
  ``commitment_resends`` times, then ``unconfirmed`` with the archive's reason;
- a transaction without a report ``commitment_timeout_seconds`` after its last N-ACTION is
  requested again (same Transaction UID) up to ``commitment_max_requests`` N-ACTIONs, then its
  objects are ``unconfirmed``;
- a transaction whose delivery is started again (``resend``) before it closed is ``superseded``
  by the catalog (:meth:`Catalog.reopen_deliveries`): never applied, so a late report cannot
  touch the objects of the new attempt, which share the delivery row and the SOP Instance UIDs.

The job itself is ``done`` once every destination took its results (see docs/architecture.md,
"What done means"): confirmation is recorded beside it, per destination and per object.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from dicom_node.catalog import Catalog, commitments
from dicom_node.catalog.tables import CommitmentRow
from dicom_node.delivery import commitment
from dicom_node.delivery.dicom import send_instances
from dicom_node.delivery.report import SendReport
from dicom_node.errors import DicomNodeError
from dicom_node.periodic import PeriodicLoop
from dicom_node.settings import DestinationSettings, Settings
from dicom_node.uids import random_uid

log = structlog.get_logger(__name__)


def _refs(row: CommitmentRow) -> list[commitment.Reference]:
    return [commitment.Reference(o["sop_class_uid"], o["sop_instance_uid"]) for o in row.objects]


def start_transaction(catalog: Catalog, job_id: int, dest: DestinationSettings, report: SendReport,
                      records: Sequence[dict[str, Any]], *, calling_ae_title: str) -> None:
    """Record the delivery with a new transaction for its sent objects, then request it."""
    now = time.time()
    objects = [{"sop_class_uid": r.sop_class_uid or "", "sop_instance_uid": r.sop_instance_uid, "path": str(r.path)}
               for r in report.results if r.refused is None]
    row = commitments.new_row(job_id, dest.name, random_uid(), objects, sent_at=now, now=now) if objects else None
    catalog.record_delivery(job_id, dest.name, ok=True, objects=records, commitment=row)
    if row is not None:
        request_now(catalog, dest, row, calling_ae_title=calling_ae_title)


def request_now(catalog: Catalog, dest: DestinationSettings, row: CommitmentRow, *, calling_ae_title: str) -> None:
    """Send one N-ACTION for ``row`` (as read), unless someone else did first; keep a report that
    comes on the same association."""
    if not commitments.claim_request(catalog, row, time.time()):
        return
    try:
        report = commitment.request(dest, row.transaction_uid, _refs(row), calling_ae_title=calling_ae_title,
                                    wait_seconds=dest.commitment_wait_seconds,
                                    reported_elsewhere=lambda: _reported(catalog, row.transaction_uid))
    except DicomNodeError as exc:
        commitments.request_failed(catalog, row.transaction_uid, str(exc))
        log.warning("commitment_request_failed", destination=dest.name, transaction_uid=row.transaction_uid,
                    request=row.requests + 1, error=str(exc))
        return
    if report is not None:
        commitments.record_report(catalog, report.transaction_uid, report.committed, report.failed, time.time())


def _reported(catalog: Catalog, transaction_uid: str) -> bool:
    current = commitments.get(catalog, transaction_uid)
    return current is None or current.state != commitments.REQUESTED


def _unconfirmed(row: CommitmentRow, reason: str) -> dict[str, dict[str, Any]]:
    return {o["sop_instance_uid"]: {"outcome": "unconfirmed", "detail": reason} for o in row.objects}


def _apply_report(catalog: Catalog, dest: DestinationSettings, row: CommitmentRow, calling: str,
                  now: float) -> CommitmentRow | None:
    """Close a reported transaction; return the follow-up transaction of objects sent again."""
    report = row.report
    committed, failed = set(report.get("committed", [])), dict(report.get("failed", {}))
    seconds = round(max((row.reported_at or now) - row.sent_at, 0.0), 3)
    outcomes: dict[str, dict[str, Any]] = {}
    again: list[dict[str, str]] = []
    for obj in row.objects:
        uid = obj["sop_instance_uid"]
        if uid in failed:
            again.append(obj)
        elif uid in committed:
            outcomes[uid] = {"outcome": "confirmed", "detail": None, "confirmation_seconds": seconds}
        else:
            outcomes[uid] = {"outcome": "unconfirmed", "detail": "missing from the archive's storage commitment report"}
    follow_up = None
    if again and row.round < dest.commitment_resends:
        try:
            send_instances(dest, [Path(o["path"]) for o in again], calling_ae_title=calling)
        except DicomNodeError as exc:
            for obj in again:
                why = failed[obj["sop_instance_uid"]]
                outcomes[obj["sop_instance_uid"]] = {
                    "outcome": "unconfirmed",
                    "detail": f"storage commitment failed: {why}; sending again failed: {exc}"}
        else:
            follow_up = commitments.new_row(row.job_id, row.destination, random_uid(), again, sent_at=time.time(),
                                            now=time.time(), round=row.round + 1)
            for obj in again:
                outcomes[obj["sop_instance_uid"]] = {
                    "outcome": "sent", "detail": f"sent again: the archive reported {failed[obj['sop_instance_uid']]}"}
    else:
        suffix = f" (after {row.round} re-send{'s' if row.round != 1 else ''})" if row.round else ""
        for obj in again:
            why = failed[obj["sop_instance_uid"]]
            outcomes[obj["sop_instance_uid"]] = {"outcome": "unconfirmed",
                                                 "detail": f"storage commitment failed: {why}{suffix}"}
    if not commitments.close(catalog, row, outcomes, now, follow_up):
        return None
    log.info("commitment_closed", destination=dest.name, transaction_uid=row.transaction_uid, job_id=row.job_id,
             confirmed=sum(1 for o in outcomes.values() if o["outcome"] == "confirmed"),
             unconfirmed=sum(1 for o in outcomes.values() if o["outcome"] == "unconfirmed"),
             sent_again=len(again) if follow_up else 0)
    for uid, o in outcomes.items():
        if o["outcome"] == "unconfirmed":
            log.warning("delivery_unconfirmed", destination=dest.name, sop_instance_uid=uid, reason=o["detail"])
    return follow_up


def advance(settings: Settings, catalog: Catalog, now: float | None = None) -> int:
    """One pass over the open transactions; returns how many it closed or requested again."""
    acted = 0
    for row in commitments.open_transactions(catalog):
        now = time.time() if now is None else now
        try:
            dest = settings.destination(row.destination)
        except KeyError:
            acted += commitments.close(catalog, row, _unconfirmed(row, "destination no longer configured"), now)
            continue
        calling = dest.calling_ae_title or settings.listener.ae_title
        if row.state == commitments.REPORTED:
            follow_up = _apply_report(catalog, dest, row, calling, now)
            acted += 1
            if follow_up is not None:
                request_now(catalog, dest, follow_up, calling_ae_title=calling)
        elif now - row.requested_at >= dest.commitment_timeout_seconds:
            acted += 1
            if row.requests >= dest.commitment_max_requests:
                reason = (f"no storage commitment report from {dest.address} within "
                          f"{dest.commitment_timeout_seconds:g} s of each of {row.requests} N-ACTION requests"
                          + (f" (last error: {row.last_error})" if row.last_error else ""))
                if commitments.close(catalog, row, _unconfirmed(row, reason), now):
                    log.warning("commitment_timed_out", destination=dest.name, transaction_uid=row.transaction_uid,
                                requests=row.requests)
            else:
                log.info("commitment_requested_again", destination=dest.name, transaction_uid=row.transaction_uid,
                         request=row.requests + 1)
                request_now(catalog, dest, row, calling_ae_title=calling)
    return acted


class CommitmentLoop(PeriodicLoop):
    """Runs :func:`advance` every ``poll_seconds`` in a thread of ``serve`` (when a destination
    asks for storage commitment)."""

    name = "commitment"
    failure_event = "commitment_pass_failed"
    join_seconds = 60.0

    def __init__(self, settings: Settings, catalog: Catalog, poll_seconds: float = 1.0) -> None:
        super().__init__()
        self.settings = settings
        self.catalog = catalog
        self.poll_seconds = poll_seconds

    @property
    def enabled(self) -> bool:
        return any(d.commitment == "storage-commitment" for d in self.settings.destinations)

    def interval(self) -> float:
        return self.poll_seconds

    def run_once(self) -> None:
        advance(self.settings, self.catalog)
