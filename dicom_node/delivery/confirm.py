"""C-FIND verification of a delivery (``[[destinations]] commitment = "find"``).

For archives without storage commitment: after the C-STORE, one IMAGE-level C-FIND (Study Root
Query/Retrieve Information Model - FIND) per delivered object, with its Study, Series and SOP
Instance UIDs as unique keys, at the destination's query SCP (``find_ae_title`` / ``find_host``
/ ``find_port``, default the destination itself).  An object the archive returns is
``confirmed``; one it does not return, or a query that fails, is ``unconfirmed`` with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import Dataset
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_node import statuses
from dicom_node.delivery.dicom import _associate, _describe, _make_ae
from dicom_node.delivery.report import CREATION_STAMP, Overwrite, Stamped, compare_stamps, read_stamp
from dicom_node.errors import TransientError
from dicom_node.settings import DestinationSettings

_log = structlog.get_logger("dicom_node.delivery.confirm")
#: C-FIND pending statuses (PS3.4 C.4.1.1.4): a match follows.
_PENDING = frozenset({0xFF00, 0xFF01})


@dataclass(frozen=True)
class Confirmation:
    """Whether the query SCP returned one delivered object, and why not."""

    sop_instance_uid: str
    confirmed: bool
    reason: str | None = None


def _image_query(stamped: Stamped, *returned: str) -> Dataset:
    """An IMAGE-level C-FIND identifier with the object's three UIDs as unique keys, asking for
    the ``returned`` keywords too."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = stamped.study_instance_uid
    query.SeriesInstanceUID = stamped.series_instance_uid
    query.SOPInstanceUID = stamped.sop_instance_uid
    for keyword in returned:
        setattr(query, keyword, "")
    return query


def _find_one(assoc: Association, query: Dataset) -> tuple[Dataset | None, int | None]:
    """Send ``query``; return the (last) match carrying its SOP Instance UID, and the final
    status (None: no final response, the query timed out or was aborted)."""
    uid = str(query.SOPInstanceUID)
    match, final = None, None
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.get("Status", -1)) if status is not None and "Status" in status else None
        if code in _PENDING and identifier is not None and str(identifier.get("SOPInstanceUID", "")) == uid:
            match = identifier
        elif code not in _PENDING:
            final = code
    return match, final


def confirm_by_find(dest: DestinationSettings, paths: Iterable[Path], *, calling_ae_title: str,
                    timeout: float = 30) -> list[Confirmation]:
    """Query ``dest``'s query SCP for each file's SOP instance; one :class:`Confirmation` each.

    Never raises for the archive's sake: an unreachable query SCP makes every object
    ``unconfirmed`` with that reason.
    """
    stamped = [read_stamp(Path(p)) for p in paths]
    if not stamped:
        return []
    where = _describe(dest.query_scp)
    try:
        assoc = _find_association(dest, calling_ae_title, timeout)
    except TransientError as exc:
        _log.warning("find_failed", destination=dest.name, reason=str(exc))
        return [Confirmation(s.sop_instance_uid, False, f"C-FIND not possible: {exc}") for s in stamped]
    out: list[Confirmation] = []
    try:
        if not assoc.accepted_contexts:
            reason = f"C-FIND not possible: {where} does not accept Study Root C-FIND"
            return [Confirmation(s.sop_instance_uid, False, reason) for s in stamped]
        for s in stamped:
            uid = s.sop_instance_uid
            match, final = _find_one(assoc, _image_query(s))
            if match is not None:
                out.append(Confirmation(uid, True))
            elif final is None:
                out.append(Confirmation(uid, False, f"C-FIND at {where} got no response (timed out or aborted)"))
            elif final != statuses.SUCCESS:
                out.append(Confirmation(uid, False, f"C-FIND at {where} failed: {statuses.describe(final)}"))
            else:
                out.append(Confirmation(uid, False, f"not found by C-FIND at {where}"))
    finally:
        if assoc.is_established:
            assoc.release()
    _log.info("find_done", destination=dest.name, confirmed=sum(c.confirmed for c in out), total=len(out))
    return out


# -- does the archive replace an object sent again with the same SOP Instance UID? ----------


def check_overwrite(dest: DestinationSettings, paths: Iterable[Path], *, calling_ae_title: str,
                    timeout: float = 30) -> list[Overwrite]:
    """After sending ``paths`` again (same SOP Instance UIDs as an earlier delivery, new content),
    ask ``dest``'s query SCP which version it holds: one IMAGE-level C-FIND per object for its
    InstanceCreationDate/Time, compared with the file's.

    Never raises for the archive's sake: a query that fails or returns no creation time is
    ``replaced=None`` (unknown), so only a clear answer ever warns.
    """
    stamped = [read_stamp(Path(p)) for p in paths]
    if not stamped:
        return []
    where = _describe(dest.query_scp)
    try:
        assoc = _find_association(dest, calling_ae_title, timeout)
    except TransientError as exc:
        return [Overwrite(s.sop_instance_uid, None, f"C-FIND not possible: {exc}") for s in stamped]
    out: list[Overwrite] = []
    try:
        if not assoc.accepted_contexts:
            return [Overwrite(s.sop_instance_uid, None, f"{where} does not accept Study Root C-FIND")
                    for s in stamped]
        for s in stamped:
            match, _ = _find_one(assoc, _image_query(s, *CREATION_STAMP))
            held = "" if match is None else " ".join(str(match.get(k, "") or "") for k in CREATION_STAMP).strip()
            out.append(compare_stamps(s.sop_instance_uid, held, s.stamp, where=where, query="C-FIND"))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _find_association(dest: DestinationSettings, calling_ae_title: str, timeout: float) -> Association:
    """An association proposing Study Root C-FIND to ``dest``'s query SCP (``TransientError``
    when it cannot be opened)."""
    ae = _make_ae(dest.calling_ae_title or calling_ae_title, timeout)
    return _associate(ae, dest.query_scp, [build_context(StudyRootQueryRetrieveInformationModelFind)])
