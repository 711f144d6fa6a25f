"""The DICOM listener: a Storage + Verification SCP that spools instances as received.

Each C-STORE dataset is written exactly as it arrived on the wire (no decode/re-encode: pixel
data stays in the transfer syntax the sender used) behind a file meta header we build, fsync'd
through :class:`~dicom_node.ingest.spool.Spool`, reported to the :class:`~dicom_node.ingest.IngestSink`,
and only then answered with success.  Only the header elements needed to place and catalog the
file are parsed.  The node never crashes on a bad peer: every failure becomes a named status
(:mod:`dicom_node.statuses`) and a log line with UIDs and AE titles (never patient data).

The protocol is served by :mod:`dicom_node.ingest.acceptor` (one thread per association, whole PDUs
read straight from the socket, ``TCP_NODELAY``/``TCP_QUICKACK`` on every accepted socket), so
unmodified DCMTK senders do not stall 40 ms per instance on delayed ACKs.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

import structlog
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts

from dicom_node import statuses
from dicom_node.dimse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.errors import InvalidUIDError
from dicom_node.ingest.acceptor import (
    Acceptor,
    AcceptorConfig,
    Association,
    AssociationRejected,
    AssociationRequest,
    EventReportRequest,
    StoreRequest,
)
from dicom_node.ingest.events import AssociationSummary, CommitmentReport, IngestSink, StoredInstance
from dicom_node.ingest.header import DataSetTooLargeError, UndecodableDatasetError, parse_header
from dicom_node.ingest.rejections import RejectionLog
from dicom_node.ingest.spool import Spool, SpoolWriteError
from dicom_node.settings import ListenerSettings, StorageSettings, TlsSettings

#: Transfer syntaxes accepted for every storage SOP class (datasets are stored as sent).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, still sent by old modalities
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # Process 1
    JPEGExtended12Bit,  # Process 2 & 4
    JPEGLossless,  # Non-Hierarchical (Process 14)
    JPEGLosslessSV1,  # First-Order Prediction (Process 14 SV1)
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: Storage Commitment Push Model: archives send their N-EVENT-REPORT to the listener on a new
#: association, as the SCP of this class (SCP/SCU Role Selection accepted either way).
STORAGE_COMMITMENT_SOP_CLASS = "1.2.840.10008.1.20.1"


def _meta_element(tag_element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_ae_title: str
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) for a dataset.

    Encoded by hand (Explicit VR Little Endian, fixed element list), byte for byte what
    pynetdicom's ``create_file_meta`` + ``encode_file_meta`` (pydicom's ``write_file_meta_info``)
    give (``tests/unit/test_file_meta.py``), because on the C-STORE path the libraries cost
    ~2.2 ms per instance against ~14 us for this (``benchmarks/file_meta.py``, docs/performance.md).
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        _meta_element(0x0016, b"AE", calling_ae_title.encode("ascii", "replace"))
        if calling_ae_title else b"",
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def fd_limit_needed(settings: ListenerSettings) -> int:
    """File descriptors the listener may hold at once, plus room for the rest of the node
    (catalog, broker, web, logs, spool folders: 256)."""
    return settings.max_associations + settings.max_pending_connections + 256


def raise_fd_limit(settings: ListenerSettings) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (an unprivileged process may) and
    return ``(soft, hard)``; log a warning when it stays below :func:`fd_limit_needed`.

    Distribution defaults are a soft limit of 1024 (or 512 under some service managers)
    under a hard one of 4096 to 1M; out of descriptors, ``accept()`` fails (EMFILE) and the
    listener can serve no sender until connections close.
    """
    log = structlog.get_logger("dicom_node.ingest.listener")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(exc))
    needed = fd_limit_needed(settings)
    if soft < needed:
        log.warning("fd_limit_low", soft=soft, hard=hard, needed=needed,
                    hint="raise LimitNOFILE (systemd) or ulimit -n; see docs/reliability.md")
    return soft, hard


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server-side TLS context (TLS >= 1.2, our certificate, optional client verification)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
        )
    elif tls.require_client_certificate:
        # Without a CA bundle no client certificate could ever be verified.
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    return ctx


class _Refused(Exception):
    """Internal: answer the C-STORE with ``status``; log ``event`` with ``fields``.

    The Error Comment sent to the peer is ``event`` in words ("store_refused_low_disk" is sent
    as "refused: low disk"), never patient data.
    """

    def __init__(self, status: int, event: str, **fields: Any) -> None:
        super().__init__(event)
        self.status = status
        self.event = event
        self.fields = fields

    @property
    def comment(self) -> str:
        return self.event.replace("store_refused_", "refused: ").replace("_", " ")


#: While the spool has this much more than ``storage.min_free_mb`` free, its free space is read
#: again only after this long (else for every instance).
FREE_SPACE_MARGIN_MB: Final = 1024
FREE_SPACE_RECHECK_S: Final = 0.5


@dataclass
class _AssociationState:
    association_id: str
    calling_ae_title: str
    log: Any
    series: set[str] = field(default_factory=set)
    stored: int = 0


class ListenerMetrics(Protocol):
    """What the listener reports to metrics (``dicom_node.metrics.NodeMetrics`` implements it)."""

    def instance_received(self, calling_ae: str, nbytes: int) -> None: ...

    def association(self, calling_ae: str, result: str) -> None: ...

    def store_status(self, status: int) -> None: ...


def _contexts() -> dict[str, tuple[str, ...]]:
    contexts = {str(cx.abstract_syntax): TRANSFER_SYNTAXES for cx in AllStoragePresentationContexts}
    contexts[VERIFICATION_SOP_CLASS] = TRANSFER_SYNTAXES[:3]
    contexts[STORAGE_COMMITMENT_SOP_CLASS] = TRANSFER_SYNTAXES[:3]
    return contexts


class Listener:
    """Storage + Verification SCP writing to a :class:`Spool` and reporting to a sink.

    The DICOM protocol is served by :class:`dicom_node.ingest.acceptor.Acceptor`; this class decides
    who may associate, and stores what arrives.

    Parameters
    ----------
    settings : ListenerSettings
        AE title, address, allowed peers, limits, timeouts, TLS.
    spool : Spool
        Where instances are written (durably, before success is answered).
    sink : IngestSink
        Told about every stored instance and every ended association; must not block long.
    storage : StorageSettings
        For the free-space watermark (``min_free_mb``).
    reuse_port : bool
        Bind with ``SO_REUSEPORT`` so several listener processes share the port (one Python
        process uses one core; the kernel spreads associations over the processes).
    """

    def __init__(
        self,
        settings: ListenerSettings,
        spool: Spool,
        sink: IngestSink,
        storage: StorageSettings,
        *,
        reuse_port: bool = False,
        metrics: ListenerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        #: The newest rejected association requests, for the dashboard (same process).
        self.rejections = RejectionLog()
        self.reuse_port = reuse_port
        self.spool = spool
        self.sink = sink
        self.storage = storage
        self._log = structlog.get_logger("dicom_node.ingest.listener").bind(
            ae_title=settings.ae_title
        )
        self._acceptor: Acceptor | None = None
        #: The last free-space reading of the spool (MiB) and when it was taken (monotonic s).
        self._free: tuple[float, float] = (0.0, -1e9)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and start serving in background threads (returns at once)."""
        if self._acceptor is not None:
            raise RuntimeError("the listener is already running")
        s = self.settings
        config = AcceptorConfig(
            contexts=_contexts(),
            role_classes=frozenset({STORAGE_COMMITMENT_SOP_CLASS}),
            maximum_pdu_size=s.maximum_pdu_size,
            acse_timeout=s.acse_timeout,
            network_timeout=s.network_timeout,
            dimse_timeout=s.dimse_timeout,
            max_message_bytes=s.max_instance_mb << 20,
            max_pending=s.max_pending_connections,
            max_request_pdu=s.max_associate_request_kb << 10,
        )
        context = server_ssl_context(s.tls) if s.tls is not None else None
        self._acceptor = Acceptor(
            (s.host, s.port), config, self, ssl_context=context, reuse_port=self.reuse_port
        )
        self._log.info(
            "listener_started", host=s.host, port=self.port, tls=s.tls is not None,
            max_associations=s.max_associations, max_pending_connections=s.max_pending_connections,
            max_instance_mb=s.max_instance_mb, acse_timeout=s.acse_timeout,
            dimse_timeout=s.dimse_timeout, network_timeout=s.network_timeout,
        )

    def stop(self) -> None:
        """Stop accepting, abort running associations and close the socket."""
        if self._acceptor is None:
            return
        self._acceptor.shutdown()  # every acknowledged instance is on disk and reported
        self._acceptor = None
        self._log.info("listener_stopped")

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``)."""
        if self._acceptor is None:
            raise RuntimeError("the listener is not running")
        return self._acceptor.port

    def readiness(self) -> tuple[bool, str]:
        """``(ok, detail)`` for ``/readyz``: false while the listener is not accepting
        connections (stopped, its accept thread gone, or ``accept()`` failing: out of file
        descriptors or kernel memory)."""
        if self._acceptor is None:
            return False, "the listener is not running"
        return self._acceptor.accepting()

    def flush(self, timeout: float = 30.0) -> bool:
        """True: the sink hears of every instance on the association's thread before its answer."""
        return True

    def active_sockets(self) -> list[socket.socket]:
        """The server-side sockets of the connections served now (for diagnostics)."""
        return [] if self._acceptor is None else self._acceptor.active_sockets()

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- association events (dicom_node.ingest.acceptor.ScpHandler) -----------------------------------
    def check(self, request: AssociationRequest, active: int) -> None:
        """Reject callers not on the allow-list, a wrong called AE title, or one too many."""
        s = self.settings
        if s.allowed_calling_ae_titles and request.calling_ae_title not in s.allowed_calling_ae_titles:
            raise AssociationRejected(1, 1, 3, "calling AE title not recognized")
        if s.require_called_ae_title and request.called_ae_title != s.ae_title:
            raise AssociationRejected(1, 1, 7, "called AE title not recognized")
        if active >= s.max_associations:
            raise AssociationRejected(2, 3, 2, "local limit exceeded (too many associations)")

    def accepted(self, assoc: Association) -> None:
        """Start the association's log context and count it."""
        calling = assoc.calling_ae_title
        state = _AssociationState(
            assoc.association_id,
            calling,
            self._log.bind(calling_ae_title=calling, association_id=assoc.association_id),
        )
        assoc.user_data = state
        state.log.info(
            "association_accepted", peer=f"{assoc.request.address}:{assoc.request.port}",
            implementation=assoc.request.implementation_version_name or None,
            contexts=len(assoc.contexts),
        )
        if self.metrics is not None:
            self.metrics.association(calling, "accepted")

    def rejected(self, request: AssociationRequest, rejection: AssociationRejected) -> None:
        """Log who was turned away and why."""
        self._log.warning(
            "association_rejected", calling_ae_title=request.calling_ae_title,
            called_ae_title=request.called_ae_title, peer=f"{request.address}:{request.port}",
            reason=rejection.text,
        )
        self.rejections.add(request.calling_ae_title, request.called_ae_title,
                            f"{request.address}:{request.port}", rejection.text)
        if self.metrics is not None:
            self.metrics.association(request.calling_ae_title, "rejected")

    def connection_failed(self, address: str, error: str) -> None:
        """A connection that never became an association (timeout, not DICOM)."""
        self._log.warning("connection_failed", peer=address, error=error)

    def tls_failed(self, address: str, error: str) -> None:
        """A TLS handshake failed; the connection is closed."""
        self._log.warning("tls_handshake_failed", peer=address, error=error)

    def ended(self, assoc: Association, released: bool, reason: str) -> None:
        """Tell the sink which series the association touched (completion listens to this)."""
        state = cast(_AssociationState, assoc.user_data)
        summary = AssociationSummary(
            association_id=state.association_id,
            calling_ae_title=state.calling_ae_title,
            released=released,
            series_instance_uids=frozenset(state.series),
            ended_at=time.time(),
        )
        (state.log.info if released else state.log.warning)(
            "association_released" if released else "association_aborted",
            instances=state.stored, series=len(state.series),
            **({} if released else {"reason": reason}),
        )
        if self.metrics is not None:
            self.metrics.association(state.calling_ae_title, "released" if released else "aborted")
        try:
            self.sink.association_ended(summary)
        except Exception:
            state.log.exception("sink_failed", sink_event="association_ended")

    # -- services ------------------------------------------------------------------------------
    def echo(self, assoc: Association) -> int:
        """Handle a C-ECHO request: always ``0x0000`` (Success)."""
        cast(_AssociationState, assoc.user_data).log.debug("echo_answered")
        return statuses.SUCCESS

    def event_report(self, assoc: Association, request: EventReportRequest) -> int:
        """Handle an N-EVENT-REPORT: a Storage Commitment result from an archive.

        Answered with success once the sink has recorded it durably (a report for a transaction
        the catalog does not know, or already has, is answered with success too and logged: the
        archive has nothing to do about it); a report that cannot be read or recorded gets
        0x0110 (processing failure), so the archive may send it again.
        """
        log = cast(_AssociationState, assoc.user_data).log
        record = getattr(self.sink, "commitment_reported", None)
        if request.affected_sop_class_uid != STORAGE_COMMITMENT_SOP_CLASS or record is None:
            log.warning("event_report_refused", sop_class=request.affected_sop_class_uid)
            return 0x0211  # unrecognized operation: only storage commitment reports are taken
        if os.environ.get("DICOM_NODE_CRASH_POINT") == "commitment_report":
            # Test hook (as dicom_node.scheduling.completion.crash_point): die before the report is
            # kept or answered, i.e. between the store and the report (crash tests).
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            report = _commitment_report(request, assoc.calling_ae_title)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            log.warning("commitment_report_unreadable", error=str(exc))
            return 0x0110
        try:
            outcome = record(report)
        except Exception:
            log.exception("sink_failed", sink_event="commitment_reported")
            return 0x0110
        (log.info if outcome == "recorded" else log.warning)(
            "commitment_report_received", transaction_uid=report.transaction_uid, event_type=report.event_type,
            committed=len(report.committed), failed=len(report.failed), outcome=outcome)
        return statuses.SUCCESS

    def store(self, assoc: Association, request: StoreRequest) -> tuple[int, str | None]:
        """Handle a C-STORE request: spool the dataset as received, then report it.

        **Attributes used**: the request's *Affected SOP Class UID* and *Affected SOP Instance
        UID*; the presentation context's transfer syntax; from the dataset header only
        *SOP Class UID*, *SOP Instance UID*, *Study Instance UID*, *Series Instance UID* and
        :data:`~dicom_node.ingest.CATALOG_ATTRIBUTES` (parsing stops before the pixel data).

        **Statuses returned** (failures carry an Error Comment naming the reason)

        - ``0x0000`` Success: the instance is on disk - written as an unnamed file,
          fdatasync'd, linked under its name and its folder fsync'd - and the sink has heard of
          it.
        - ``0xA700`` Refused, out of resources: free space below ``storage.min_free_mb``
          (nothing written), a deflated data set that inflates beyond ``max_instance_mb``
          ("refused: too large"), or the write failed.
        - ``0xA900`` Error, dataset does not match SOP class: the dataset's SOP Class/Instance
          UID differs from the request's, or a UID is missing, invalid, > 64 characters or
          holds ``../`` (it would become a path part), or the SOP Instance UID is already
          stored in another study or series (Error Comment "refused: duplicate sop instance").
        - ``0xC210`` Error, cannot understand: the whole data set does not parse in the
          negotiated transfer syntax (a length past the end, the other VR encoding, a VR that
          is none, an undelimited sequence, bytes after the end: :func:`~dicom_node.ingest.header.walk`).
        - ``0xC211`` Error, processing failure: anything unexpected (traceback logged).
        """
        received_at = time.time()
        state = cast(_AssociationState, assoc.user_data)
        comment: str | None = None
        try:
            status = self._store(request, state, received_at)
        except _Refused as refused:
            state.log.warning(
                refused.event, status=f"0x{refused.status:04X}",
                sop_instance_uid=request.affected_sop_instance_uid[:80], **refused.fields,
            )
            status, comment = refused.status, refused.comment
        except Exception:
            state.log.exception(
                "store_failed", status=f"0x{statuses.PROCESSING_FAILURE:04X}",
                sop_instance_uid=request.affected_sop_instance_uid[:80],
            )
            status, comment = statuses.PROCESSING_FAILURE, "internal error, see the node's log"
        if self.metrics is not None:
            self.metrics.store_status(status)
        return status, comment

    def _free_mb(self) -> float:
        """The spool's free space: a ``statfs`` per instance near the watermark, else one every
        ``FREE_SPACE_RECHECK_S`` (no sender fills ``FREE_SPACE_MARGIN_MB`` in that time)."""
        measured, at = self._free
        now = time.monotonic()
        if now - at < FREE_SPACE_RECHECK_S and measured >= self.storage.min_free_mb + FREE_SPACE_MARGIN_MB:
            return measured
        measured = self.spool.free_mb()
        self._free = (measured, now)
        return measured

    def _refuse_duplicate(self, study: str, series: str, sop_instance: str) -> None:
        """0xA900 for a SOP Instance UID the sink holds in another study/series (see
        :class:`~dicom_node.ingest.events.InstanceClaims`); nothing is written."""
        claim = getattr(self.sink, "claim", None)
        owner = claim(study, series, sop_instance) if claim is not None else None
        if owner is not None:
            raise _Refused(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "store_refused_duplicate_sop_instance",
                study_instance_uid=study, series_instance_uid=series,
                stored_study_instance_uid=owner[0], stored_series_instance_uid=owner[1],
            )

    def _store(self, req: StoreRequest, state: _AssociationState, received_at: float) -> int:
        free = self._free_mb()
        if free < self.storage.min_free_mb:
            raise _Refused(
                statuses.OUT_OF_RESOURCES, "store_refused_low_disk",
                free_mb=round(free, 1), min_free_mb=self.storage.min_free_mb,
            )
        transfer_syntax = req.context.transfer_syntax
        abstract_syntax = req.context.abstract_syntax
        try:
            found, attributes = parse_header(
                req.dataset, transfer_syntax, max_inflated=self.settings.max_instance_mb << 20
            )
        except DataSetTooLargeError:
            # Out of resources: a limit of this node, not a fault of the data set's encoding.
            raise _Refused(
                statuses.OUT_OF_RESOURCES, "store_refused_too_large",
                transfer_syntax_uid=transfer_syntax, max_instance_mb=self.settings.max_instance_mb,
            ) from None
        except UndecodableDatasetError as exc:
            raise _Refused(
                statuses.CANNOT_UNDERSTAND, "store_refused_undecodable",
                transfer_syntax_uid=transfer_syntax, error=str(exc.__cause__)[:200],
            ) from None
        if found["SOPClassUID"] is None and found["SOPInstanceUID"] is None:
            # Nothing recognisable: not a DICOM dataset in this transfer syntax.
            raise _Refused(
                statuses.CANNOT_UNDERSTAND, "store_refused_undecodable",
                transfer_syntax_uid=transfer_syntax, error="no SOP Class/Instance UID found",
            )
        affected_class = req.affected_sop_class_uid
        affected_instance = req.affected_sop_instance_uid
        sop_class = str(found["SOPClassUID"] or "")
        sop_instance = str(found["SOPInstanceUID"] or "")
        if sop_class != affected_class or affected_class != abstract_syntax:
            raise _Refused(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "store_refused_sop_class_mismatch",
                sop_class_uid=sop_class[:80], affected_sop_class_uid=affected_class[:80],
                negotiated_sop_class_uid=abstract_syntax,
            )
        if sop_instance != affected_instance:
            raise _Refused(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "store_refused_sop_instance_mismatch",
                dataset_sop_instance_uid=sop_instance[:80],
            )
        study = str(found["StudyInstanceUID"] or "")
        series = str(found["SeriesInstanceUID"] or "")
        try:
            path = self.spool.path_for(study, series, sop_instance)  # validates the three UIDs
        except InvalidUIDError as exc:
            raise _Refused(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "store_refused_invalid_uid",
                error=str(exc),
            ) from None
        self._refuse_duplicate(study, series, sop_instance)
        meta = file_meta_bytes(sop_class, sop_instance, transfer_syntax, state.calling_ae_title)
        size = len(meta) + len(req.dataset)
        instance = StoredInstance(
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax_uid=transfer_syntax,
            path=path,
            size=size,
            calling_ae_title=state.calling_ae_title,
            association_id=state.association_id,
            received_at=received_at,
            attributes=attributes,
        )
        try:
            self.spool.store_at(path, [meta, req.dataset])
        except SpoolWriteError as exc:
            raise _Refused(statuses.OUT_OF_RESOURCES, "store_refused_write_failed",
                           error=str(exc)) from None
        try:
            self.sink.instance_stored(instance)
        except Exception:
            state.log.exception("sink_failed", sink_event="instance_stored")
        if self.metrics is not None:
            self.metrics.instance_received(state.calling_ae_title, size)
        state.series.add(series)
        state.stored += 1
        return statuses.SUCCESS


def _commitment_report(request: EventReportRequest, calling_ae_title: str) -> CommitmentReport:
    """Decode the Event Information of a Storage Commitment N-EVENT-REPORT (PS3.4 Table J.3-2)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    if request.dataset is None:
        raise ValueError("N-EVENT-REPORT without Event Information")
    syntax = request.context.transfer_syntax
    info = read_dataset(BytesIO(request.dataset), is_implicit_VR=syntax == ImplicitVRLittleEndian,
                        is_little_endian=syntax != ExplicitVRBigEndian)
    uid = str(info.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("N-EVENT-REPORT without a Transaction UID")
    committed = tuple(str(i.get("ReferencedSOPInstanceUID", "")) for i in info.get("ReferencedSOPSequence", []))
    failed = {}
    for item in info.get("FailedSOPSequence", []):
        code = item.get("FailureReason")
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = statuses.commitment_failure(
            None if code is None else int(code))
    return CommitmentReport(uid, int(request.event_type_id or 0), committed, failed, calling_ae_title, time.time())
