"""C-STORE SCU: send spooled or encoded files to a destination, classifying every failure.

Files are sent as stored: each is proposed in its own transfer syntax (read from its file meta)
plus Explicit VR Little Endian, and when the peer accepts the file's own syntax the dataset bytes
go out unchanged (read from the file, never decoded).  The transport is tuned like the listener's
(:mod:`dicom_node.dimse`), so a Nagle-ing archive does not stall us 40 ms per instance either.

Errors split by how the caller (the dispatch task) reacts:

- :class:`~dicom_node.errors.TransientError` - connection refused, timed out, association
  rejected or aborted, status 0xA7xx (out of resources): retry later with backoff.
- :class:`~dicom_node.errors.PermanentError` - any other failure status (0xA9xx, 0xCxxx...),
  a transfer syntax the destination does not accept, an unreadable file, or a destination that
  refuses the class of every file: fail with the reason.
- Warnings (0xB0xx) count as success; the warning is kept in the :class:`SendReport`.

Partial delivery: a SOP class the destination refuses at negotiation (no accepted presentation
context for it, e.g. an archive without Segmentation Storage) is not an error as long as the
destination accepts some other file: that file is recorded as refused
(``"refused: Segmentation Storage not accepted"``) and the others are sent.
:func:`capabilities` proposes each result class and reports which ones a destination accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import statuses
from dicom_node._compat.pynetdicom import (
    TunedAE,
    TunedAssociationSocket,
    queued_associate_reply,
    send_files_as_stored_bytes,
)
from dicom_node.delivery.report import InstanceResult, Overwrite, SendReport
from dicom_node.errors import AssociationRejectedError, PermanentError, TransientError
from dicom_node.settings import DestinationSettings

#: pynetdicom accepts at most 128 presentation contexts per association.
MAX_CONTEXTS = 128
#: A-ASSOCIATE-RJ results: rejected-permanent (1) and rejected-transient (2), PS3.8 9.3.4.
_REJECT_RESULTS = frozenset({0x01, 0x02})
_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})

_log = structlog.get_logger("dicom_node.delivery.dicom")


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _describe(dest: DestinationSettings) -> str:
    # The destination's name is in the structured log context; the message names the peer.
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def _read_meta(path: Path) -> _File:
    try:
        meta = read_file_meta_info(path)
        return _File(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
    except (OSError, AttributeError, ValueError, KeyError) as exc:
        raise PermanentError(f"cannot send {path}: not a readable DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises its own InvalidDicomError and friends
        raise PermanentError(f"cannot send {path}: not a readable DICOM file ({exc})") from exc


def _contexts_for(files: Sequence[_File]) -> list[PresentationContext]:
    """One context per (SOP class, stored syntax) and per (SOP class, Explicit VR LE)."""
    pairs: dict[tuple[str, str], None] = {}
    for f in files:
        pairs[(f.sop_class_uid, f.transfer_syntax_uid)] = None
        pairs[(f.sop_class_uid, ExplicitVRLittleEndian)] = None
    return [build_context(sop, [ts]) for sop, ts in pairs]


def _batches(files: Sequence[_File]) -> list[list[_File]]:
    """Split ``files`` so that no association needs more than 128 presentation contexts."""
    out: list[list[_File]] = []
    current: list[_File] = []
    pairs: set[tuple[str, str]] = set()
    for f in files:
        new = {(f.sop_class_uid, f.transfer_syntax_uid), (f.sop_class_uid, ExplicitVRLittleEndian)}
        if current and len(pairs | new) > MAX_CONTEXTS:
            out.append(current)
            current, pairs = [], set()
        current.append(f)
        pairs |= new
    if current:
        out.append(current)
    return out


def _make_ae(calling_ae_title: str, timeout: float) -> TunedAE:
    ae = TunedAE(ae_title=calling_ae_title)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _rejection(assoc: Association) -> tuple[bool, A_ASSOCIATE | None]:
    """Whether the peer rejected ``assoc``, and its A-ASSOCIATE-RJ primitive when known.

    pynetdicom (3.0) can miss a reject: after starting the connection, the requesting thread
    waits for the transport to be ready and then checks that the socket is still connected.
    An archive that answers the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ and closes the
    connection at once (DCMTK's ``storescp --refuse``) lets the reactor thread receive the
    reject and close the socket before that check runs on a busy machine; pynetdicom then
    aborts and leaves the reject primitive unread at the head of the DUL's ``to_user_queue``.
    It is read from there, so the admin sees the archive's reason, not an abort.
    """
    if assoc.is_rejected:
        return True, assoc.acceptor.primitive
    pending = queued_associate_reply(assoc)
    if isinstance(pending, A_ASSOCIATE) and pending.result in _REJECT_RESULTS:
        return True, pending
    return False, None


def _associate(
    ae: TunedAE, dest: DestinationSettings, contexts: list[PresentationContext], **extra: Any
) -> Association:
    """Open an association or raise :class:`TransientError` saying why it failed.

    ``extra`` goes to ``AE.associate`` (``ext_neg``, ``evt_handlers``).
    """
    assert dest.port is not None  # the settings require host and port for a dicom destination
    assoc = ae.associate(dest.host, dest.port, contexts=contexts, ae_title=dest.ae_title, max_pdu=0, **extra)
    if assoc.is_established:
        return assoc
    where = _describe(dest)
    rejected, rsp = _rejection(assoc)
    if rejected:
        detail = (
            f"{rsp.result_str}, source {rsp.source_str}: {rsp.reason_str}".lower()
            if rsp is not None else "no reason given"
        )
        raise AssociationRejectedError(f"archive {where} rejected the association ({detail})")
    sock = assoc.dul.socket
    error = sock.connect_error if isinstance(sock, TunedAssociationSocket) else None
    if error is not None:
        reason = "timed out" if isinstance(error, TimeoutError) else (
            error.strerror or str(error)
        ).lower()
        raise TransientError(f"archive {where} unreachable: {reason}")
    raise TransientError(f"archive {where} aborted the association during negotiation")


def _accepted_syntax(assoc: Association, f: _File) -> str | None:
    accepted = {
        (str(cx.abstract_syntax), str(ts))
        for cx in assoc.accepted_contexts
        for ts in cx.transfer_syntax
    }
    if (f.sop_class_uid, f.transfer_syntax_uid) in accepted:
        return f.transfer_syntax_uid
    if (f.sop_class_uid, ExplicitVRLittleEndian) in accepted and (
        f.transfer_syntax_uid in _UNCOMPRESSED
    ):
        return ExplicitVRLittleEndian
    return None


def _refusal(assoc: Association, f: _File) -> str | None:
    """``"refused: <class> not accepted"`` when no accepted context has the file's SOP class."""
    if any(str(cx.abstract_syntax) == f.sop_class_uid for cx in assoc.accepted_contexts):
        return None
    return f"refused: {UID(f.sop_class_uid).name} not accepted"


def _store_one(assoc: Association, dest: DestinationSettings, f: _File) -> InstanceResult:
    refused = _refusal(assoc, f)
    if refused is not None:
        return InstanceResult(f.path, f.sop_instance_uid, 0, refused=refused, sop_class_uid=f.sop_class_uid)
    syntax = _accepted_syntax(assoc, f)
    if syntax is None:
        raise PermanentError(
            f"archive {_describe(dest)} accepts neither {UID(f.transfer_syntax_uid).name} nor a "
            f"conversion for {UID(f.sop_class_uid).name} (SOP instance {f.sop_instance_uid})"
        )
    try:
        if syntax == f.transfer_syntax_uid:
            # The file path makes pynetdicom send the stored dataset bytes unchanged (with
            # chunked sending on, it streams them from the file; see send_instances).
            rsp = assoc.send_c_store(f.path)
        else:
            # The peer takes only Explicit VR LE: decode and re-encode (uncompressed only).
            ds = dcmread(f.path)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError) as exc:
        raise PermanentError(
            f"cannot send SOP instance {f.sop_instance_uid} from {f.path}: {exc}"
        ) from exc
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        raise TransientError(
            f"archive {_describe(dest)} sent no C-STORE response for SOP instance "
            f"{f.sop_instance_uid} (timed out or aborted)"
        )
    status = int(status)
    comment = str(rsp.get("ErrorComment", "") or "")
    if statuses.is_success(status):
        return InstanceResult(f.path, f.sop_instance_uid, status, sop_class_uid=f.sop_class_uid)
    if statuses.is_warning(status):
        warning = statuses.describe(status) + (f": {comment}" if comment else "")
        return InstanceResult(f.path, f.sop_instance_uid, status, warning, sop_class_uid=f.sop_class_uid)
    message = (
        f"archive {_describe(dest)} answered {statuses.describe(status)} for SOP instance "
        f"{f.sop_instance_uid}" + (f": {comment}" if comment else "")
    )
    if statuses.is_out_of_resources(status):
        raise TransientError(message)
    raise PermanentError(message)


def send_instances(
    dest: DestinationSettings,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout: float = 30,
) -> SendReport:
    """C-STORE every file in ``paths`` to ``dest``; return the per-file outcome.

    Parameters
    ----------
    dest : DestinationSettings
        The archive (AE title, host, port).
    paths : Sequence[Path]
        DICOM Part 10 files; each is proposed in its stored transfer syntax and Explicit VR LE.
    calling_ae_title : str
        Our AE title towards ``dest`` (``dest.calling_ae_title`` wins when set).
    timeout : float
        Seconds for connecting, negotiating and waiting for each response.

    Raises
    ------
    TransientError
        Unreachable, rejected or aborted association; 0xA7xx (out of resources).
    PermanentError
        Any other failure status, an unacceptable transfer syntax, an unreadable file, or every
        file of a class the destination refuses (a refused class among accepted ones is only
        recorded in the report).
    """
    files = [_read_meta(Path(p)) for p in paths]
    if not files:
        return SendReport(dest.name, ())
    send_files_as_stored_bytes()
    log = _log.bind(destination=dest.name, called_ae_title=dest.ae_title)
    results: list[InstanceResult] = []
    ae = _make_ae(dest.calling_ae_title or calling_ae_title, timeout)
    for batch in _batches(files):
        assoc = _associate(ae, dest, _contexts_for(batch))
        try:
            for f in batch:
                result = _store_one(assoc, dest, f)
                results.append(result)
                if result.warning:
                    log.warning("instance_stored_with_warning",
                                sop_instance_uid=f.sop_instance_uid, warning=result.warning)
                elif result.refused:
                    log.warning("instance_refused", sop_instance_uid=f.sop_instance_uid,
                                reason=result.refused)
        except BaseException:
            assoc.abort()
            raise
        assoc.release()
    report = SendReport(dest.name, tuple(results))
    if report.refused and not report.sent:
        reasons = sorted({r.refused for r in report.refused if r.refused})
        raise PermanentError(f"archive {_describe(dest)} accepts none of the files: {'; '.join(reasons)}")
    log.info("instances_sent", count=report.sent, warnings=len(report.warnings), refused=len(report.refused))
    return report


def echo(dest: DestinationSettings, *, calling_ae_title: str = "DICOM_NODE",
         timeout: float = 10) -> bool:
    """C-ECHO ``dest``; ``True`` when it answers success, ``False`` on any failure."""
    return probe_echo(dest, calling_ae_title=calling_ae_title, timeout=timeout)[0] == "answers"


def probe_echo(dest: DestinationSettings, *, calling_ae_title: str = "DICOM_NODE",
               timeout: float = 10) -> tuple[str, str]:
    """C-ECHO ``dest`` and say how it went: ``("answers", "")`` on success; ``("rejected",
    why)`` when it refused the association (it is up, but not for this calling AE title, say);
    ``("down", why)`` when nothing answered, or the echo failed."""
    ae = _make_ae(dest.calling_ae_title or calling_ae_title, timeout)
    try:
        assoc = _associate(ae, dest, [build_context(Verification)])
    except TransientError as exc:
        _log.info("echo_failed", destination=dest.name, reason=str(exc))
        return ("rejected" if isinstance(exc, AssociationRejectedError) else "down"), str(exc)
    try:
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release()
    if status == statuses.SUCCESS:
        return "answers", ""
    return "down", "no C-ECHO response" if status is None else f"C-ECHO status 0x{status:04X}"


#: The classes of the node's results, proposed by :func:`capabilities`.
RESULT_CLASSES: tuple[str, ...] = (
    SegmentationStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)


def capabilities(dest: DestinationSettings, *, calling_ae_title: str = "DICOM_NODE",
                 timeout: float = 10, classes: Sequence[str] = RESULT_CLASSES) -> dict[str, bool]:
    """Propose each of ``classes`` (Explicit and Implicit VR LE) and report which ``dest`` accepts.

    Raises :class:`TransientError` when the association cannot be opened at all.
    """
    ae = _make_ae(dest.calling_ae_title or calling_ae_title, timeout)
    contexts = [build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for uid in classes]
    assoc = _associate(ae, dest, contexts)
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    return {uid: uid in accepted for uid in classes}


def send(dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str) -> SendReport:
    """The ``dicom`` target of :mod:`dicom_node.delivery`: :func:`send_instances`."""
    return send_instances(dest, paths, calling_ae_title=calling_ae_title)


def reachable(dest: DestinationSettings, *, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
    """The ``dicom`` target's check: a C-ECHO."""
    ok = echo(dest, calling_ae_title=calling_ae_title, timeout=timeout)
    return ok, "answers C-ECHO" if ok else "does not answer C-ECHO"


def check_overwrite(dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str,
                    timeout: float = 30.0) -> list[Overwrite]:
    """The ``dicom`` target's answer to "which version do you hold?": an IMAGE-level C-FIND per
    object at the destination's query SCP (:func:`dicom_node.delivery.confirm.check_overwrite`)."""
    from dicom_node.delivery.confirm import check_overwrite as by_find  # confirm builds on this module

    return by_find(dest, paths, calling_ae_title=calling_ae_title, timeout=timeout)
