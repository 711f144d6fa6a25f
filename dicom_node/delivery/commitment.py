"""Storage Commitment Push Model SCU (PS3.4 Annex J): ask an archive to commit what it stored.

After the C-STORE the node sends an N-ACTION (Action Type 1, *Request Storage Commitment*) to
the well-known instance 1.2.840.10008.1.20.1.1 with a Transaction UID and the Referenced SOP
Sequence of the delivered objects.  The archive answers with an N-EVENT-REPORT (Event Type 1:
all committed, 2: some failed, with a Failure Reason each), either on the same association
(when it accepts our SCP role, proposed by SCP/SCU Role Selection, and answers within
``commitment_wait_seconds``) or later, on an association it opens to the node's listener.
This module only speaks DICOM; the transaction's state lives in the catalog
(:mod:`dicom_node.catalog.commitments`) and :mod:`dicom_node.scheduling.commitment` drives it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.presentation import build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from dicom_node import statuses
from dicom_node.delivery.dicom import _associate, _describe, _make_ae
from dicom_node.errors import TransientError
from dicom_node.settings import DestinationSettings

_log = structlog.get_logger("dicom_node.delivery.commitment")

#: N-ACTION Action Type ID of a commitment request; N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3).
REQUEST_ACTION = 1
EVENT_SUCCESS = 1
EVENT_FAILURES = 2
@dataclass(frozen=True)
class Reference:
    """One object asked to be committed."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Report:
    """An N-EVENT-REPORT of the Storage Commitment Push Model, decoded."""

    transaction_uid: str
    event_type: int
    committed: tuple[str, ...]
    #: SOP Instance UID -> readable reason (``"no such object instance (0x0112)"``).
    failed: dict[str, str]


def action_dataset(transaction_uid: str, refs: Sequence[Reference]) -> Dataset:
    """The N-ACTION-RQ's Action Information (PS3.4 Table J.3-1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return ds


def parse_report(event_type: int | None, info: Dataset) -> Report:
    """Decode an N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2).

    Raises ``ValueError`` when it carries no Transaction UID.
    """
    uid = str(info.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("N-EVENT-REPORT without a Transaction UID")
    committed = tuple(str(i.get("ReferencedSOPInstanceUID", "")) for i in info.get("ReferencedSOPSequence", []))
    failed = {}
    for item in info.get("FailedSOPSequence", []):
        code = item.get("FailureReason")
        reason = statuses.commitment_failure(None if code is None else int(code))
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = reason
    return Report(uid, int(event_type or 0), committed, failed)


def request(dest: DestinationSettings, transaction_uid: str, refs: Sequence[Reference], *,
            calling_ae_title: str, wait_seconds: float, timeout: float = 30,
            reported_elsewhere: Callable[[], bool] | None = None) -> Report | None:
    """Send one N-ACTION for ``refs``; return the report if it came on this association within
    ``wait_seconds``, else ``None`` (it will come on a new association, or never).

    ``reported_elsewhere`` (polled every 0.25 s while waiting) ends the wait early when the
    report already came on another association, so an archive that always reports on a new one
    costs no waiting.

    Raises
    ------
    TransientError
        Unreachable or refusing archive, no Storage Commitment context accepted, or an N-ACTION
        answered with a failure status: the request is sent again later.
    """
    where = _describe(dest)
    got: dict[str, Report] = {}
    arrived = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        try:
            report = parse_report(event.event_type, event.event_information)
        except (ValueError, AttributeError, TypeError) as exc:
            _log.warning("commitment_report_unreadable", destination=dest.name, error=str(exc))
            return 0x0110, None
        got[report.transaction_uid] = report
        if report.transaction_uid == transaction_uid:
            arrived.set()
        return statuses.SUCCESS, None

    ae = _make_ae(dest.calling_ae_title or calling_ae_title, timeout)
    context = build_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    # Role selection: we are SCU (we send the N-ACTION) and SCP (we take the N-EVENT-REPORT).
    role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    assoc = _associate(ae, dest, [context], ext_neg=[role],
                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        if not assoc.accepted_contexts:
            raise TransientError(f"archive {where} does not accept Storage Commitment Push Model")
        status, _reply = assoc.send_n_action(action_dataset(transaction_uid, refs), REQUEST_ACTION,
                                             StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        code = int(status.get("Status", -1)) if status is not None and "Status" in status else None
        if code is None:
            raise TransientError(f"archive {where} sent no N-ACTION response (timed out or aborted)")
        if not statuses.is_success(code):
            raise TransientError(f"archive {where} answered the commitment request with {statuses.describe(code)}")
        deadline = time.monotonic() + wait_seconds
        while not arrived.wait(min(0.25, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline or (reported_elsewhere is not None and reported_elsewhere()):
                break
    finally:
        if assoc.is_established:
            assoc.release()
    report = got.get(transaction_uid)
    _log.info("commitment_requested", destination=dest.name, transaction_uid=transaction_uid, objects=len(refs),
              reported_on_same_association=report is not None)
    return report
