"""The DICOM listener: a Storage + Verification SCP that spools instances as received.

Each C-STORE dataset is written exactly as it arrived on the wire (no decode/re-encode: pixel
data stays in the transfer syntax the sender used) behind a file meta header we build, fsync'd
through :class:`~dicom_node.spool.Spool`, reported to the :class:`~dicom_node.ingest.IngestSink`,
and only then answered with success.  Only the header elements needed to place and catalog the
file are parsed.  The node never crashes on a bad peer: every failure becomes a named status
(:mod:`dicom_node.statuses`) and a log line with UIDs and AE titles (never patient data).

The transport is tuned by :mod:`dicom_node.net` (``TCP_NODELAY``/``TCP_QUICKACK`` on every
accepted socket, event-driven upper layer), so unmodified DCMTK senders do not stall 40 ms per
instance on delayed ACKs.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO, Protocol, cast

import structlog
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from dicom_node import statuses
from dicom_node.errors import InvalidUIDError, PermanentError
from dicom_node.ingest import CATALOG_ATTRIBUTES, AssociationSummary, IngestSink, StoredInstance
from dicom_node.net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, TunedAE, TunedAssociationServer
from dicom_node.settings import ListenerSettings, StorageSettings, TlsSettings
from dicom_node.spool import Spool, SpoolWriteError
from dicom_node.uids import validate_uid

#: Transfer syntaxes accepted for every storage SOP class (datasets are stored as sent).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TAGS: dict[str, int] = {
    k: cast(int, tag_for_keyword(k))
    for k in ("SpecificCharacterSet", *_UID_KEYWORDS, *CATALOG_ATTRIBUTES)
}
_HEADER_TAGS: list[BaseTag | int] = [Tag(t) for t in _TAGS.values()]
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_header(stream: BinaryIO, transfer_syntax: str) -> Dataset:
    """Parse only the elements the listener needs (UIDs, catalog attributes) from a raw dataset.

    ``stream`` holds the dataset as received (no file meta) in ``transfer_syntax``; reading stops
    before the pixel data, so pixel bytes are never touched.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        stream.seek(0)
        stream = BytesIO(zlib.decompress(stream.read(), -zlib.MAX_WBITS))
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    stream.seek(0)
    return read_dataset(
        stream, implicit, little, stop_when=_at_pixel_data, specific_tags=_HEADER_TAGS
    )


def _element_text(header: Dataset, tag: int, encodings: list[str]) -> str | None:
    """The raw value of a string element as text (no pydicom value conversion, ~10x faster)."""
    elem = header.get_item(tag)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if not isinstance(value, bytes):
        # Already converted (or a non-string VR): format what pydicom gives us.
        if isinstance(value, MultiValue | list | tuple):
            return "\\".join(str(v) for v in value)
        return str(value)
    vr = elem.VR or dictionary_VR(tag)
    if vr == "UI":
        return value.rstrip(b"\x00 ").decode("ascii", "replace")
    text = decode_bytes(value, encodings, {0x5C}) if vr in _TEXT_VRS else value.decode(
        "ascii", "replace"
    )
    return "\\".join(part.strip(" \x00") for part in text.split("\\"))


def header_values(
    header: Dataset,
) -> tuple[dict[str, str | None], dict[str, str | int | float]]:
    """The UIDs (:data:`_UID_KEYWORDS`) and catalog attributes found in a parsed header.

    Numbers become ``int`` (IS) or ``float`` (DS); multi-valued strings stay ``a\\b``;
    values that do not parse are left out (they are optional catalog hints).
    """
    charset = _element_text(header, 0x00080005, ["iso8859"])
    encodings = convert_encodings(charset.split("\\") if charset else None)
    uids = {k: _element_text(header, _TAGS[k], encodings) for k in _UID_KEYWORDS}
    attributes: dict[str, str | int | float] = {}
    for keyword in CATALOG_ATTRIBUTES:
        tag = _TAGS[keyword]
        try:
            text = _element_text(header, tag, encodings)
            if not text:
                continue
            vr = dictionary_VR(tag)
            if vr == "IS":
                attributes[keyword] = int(float(text.split("\\")[0]))
            elif vr == "DS":
                attributes[keyword] = float(text.split("\\")[0])
            else:
                attributes[keyword] = text
        except Exception:  # noqa: S112 - a malformed optional attribute is not worth a refusal
            continue
    return uids, attributes


class UndecodableDatasetError(PermanentError):
    """A received data set whose header cannot be parsed in its transfer syntax (0xC210)."""


def parse_header(
    stream: BinaryIO, transfer_syntax: str
) -> tuple[dict[str, str | None], dict[str, str | int | float]]:
    """:func:`read_header` + :func:`header_values`, with every parsing failure as one error.

    Raises
    ------
    UndecodableDatasetError
        When the bytes are not a data set in ``transfer_syntax`` (truncated, garbage, absurd
        lengths...), naming the transfer syntax and what went wrong.
    """
    try:
        return header_values(read_header(stream, transfer_syntax))
    except Exception as exc:  # untrusted bytes: pydicom/zlib/struct raise a dozen types here
        raise UndecodableDatasetError(
            f"the data set cannot be decoded as {transfer_syntax}: {type(exc).__name__}: {exc}"[:300]
        ) from exc


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

    Encoded by hand (Explicit VR Little Endian, fixed element list): pydicom's writer costs
    ~0.7 ms per instance, this ~10 us.
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
    """Internal: answer the C-STORE with ``status`` and log ``event`` with ``fields``."""

    def __init__(self, status: int, event: str, **fields: Any) -> None:
        super().__init__(event)
        self.status = status
        self.event = event
        self.fields = fields


@dataclass
class _AssociationState:
    association_id: str
    calling_ae_title: str
    log: Any
    series: set[str] = field(default_factory=set)
    stored: int = 0
    reported: bool = False


class ListenerMetrics(Protocol):
    """What the listener reports to metrics (``dicom_node.metrics.NodeMetrics`` implements it)."""

    def instance_received(self, calling_ae: str, nbytes: int) -> None: ...

    def association(self, calling_ae: str, result: str) -> None: ...

    def store_status(self, status: int) -> None: ...


class Listener:
    """Storage + Verification SCP writing to a :class:`Spool` and reporting to a sink.

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
        self.reuse_port = reuse_port
        self.spool = spool
        self.sink = sink
        self.storage = storage
        self._log = structlog.get_logger("dicom_node.listener").bind(
            ae_title=settings.ae_title
        )
        self._ae: TunedAE | None = None
        self._server: TunedAssociationServer | None = None
        self._lock = threading.Lock()
        self._states: dict[int, _AssociationState] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and start serving in background threads (returns at once)."""
        if self._server is not None:
            raise RuntimeError("the listener is already running")
        s = self.settings
        ae = TunedAE(ae_title=s.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION_SOP_CLASS, list(TRANSFER_SYNTAXES[:3]))
        ae.require_calling_aet = list(s.allowed_calling_ae_titles)
        ae.require_called_aet = s.require_called_ae_title
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.maximum_pdu_size
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_CONN_CLOSE, self._handle_conn_close),
        ]
        context = server_ssl_context(s.tls) if s.tls is not None else None
        server = ae.start_tuned_server(
            (s.host, s.port), ae_title=s.ae_title, ssl_context=context, evt_handlers=handlers,
            reuse_port=self.reuse_port,
        )
        server.on_tls_error = self._tls_failed
        # pynetdicom's per-PDU debug log handlers are bound per association: TunedAssociation
        # (dicom_node.net) unbinds them there.
        self._ae, self._server = ae, server
        self._log.info(
            "listener_started", host=s.host, port=self.port, tls=s.tls is not None,
            max_associations=s.max_associations,
        )

    def stop(self) -> None:
        """Stop accepting, abort running associations and close the socket."""
        if self._server is None or self._ae is None:
            return
        self._server.shutdown()
        self._ae.shutdown()
        self._server = None
        self._ae = None
        self._log.info("listener_stopped")

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the listener is not running")
        return int(self._server.server_address[1])

    def active_sockets(self) -> list[socket.socket]:
        """The server-side sockets of the associations running now (for diagnostics)."""
        if self._server is None:
            return []
        out = []
        for assoc in self._server.active_associations:
            wrapper = assoc.dul.socket
            if wrapper is not None and wrapper.socket is not None:
                out.append(wrapper.socket)
        return out

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- association events --------------------------------------------------------------------
    def _state(self, assoc: Any) -> _AssociationState:
        with self._lock:
            state = self._states.get(id(assoc))
            if state is None:
                calling = str(assoc.requestor.ae_title)
                association_id = uuid.uuid4().hex[:16]
                state = _AssociationState(
                    association_id,
                    calling,
                    self._log.bind(calling_ae_title=calling, association_id=association_id),
                )
                self._states[id(assoc)] = state
            return state

    def _handle_accepted(self, event: evt.Event) -> None:
        state = self._state(event.assoc)
        peer = event.assoc.requestor.address_info
        state.log.info(
            "association_accepted", peer=f"{peer.address}:{peer.port}" if peer else None
        )
        if self.metrics is not None:
            self.metrics.association(state.calling_ae_title, "accepted")

    def _handle_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title) if rq is not None else ""
        called = str(rq.called_ae_title) if rq is not None else ""
        allowed = self.settings.allowed_calling_ae_titles
        if allowed and calling not in allowed:
            reason = "calling AE title not recognized"
        elif self.settings.require_called_ae_title and called != self.settings.ae_title:
            reason = "called AE title not recognized"
        else:
            reason = "local limit exceeded (too many associations)"
        self._log.warning(
            "association_rejected", calling_ae_title=calling, called_ae_title=called,
            reason=reason,
        )
        if self.metrics is not None:
            self.metrics.association(calling, "rejected")

    def _end(self, assoc: Any, released: bool) -> None:
        with self._lock:
            state = self._states.pop(id(assoc), None)
            if state is None or state.reported:
                return
            state.reported = True
        summary = AssociationSummary(
            association_id=state.association_id,
            calling_ae_title=state.calling_ae_title,
            released=released,
            series_instance_uids=frozenset(state.series),
            ended_at=time.time(),
        )
        state.log.info(
            "association_released" if released else "association_aborted",
            instances=state.stored, series=len(state.series),
        )
        if self.metrics is not None:
            self.metrics.association(state.calling_ae_title, "released" if released else "aborted")
        try:
            self.sink.association_ended(summary)
        except Exception:
            state.log.exception("sink_failed", sink_event="association_ended")

    def _handle_released(self, event: evt.Event) -> None:
        self._end(event.assoc, released=True)

    def _handle_aborted(self, event: evt.Event) -> None:
        self._end(event.assoc, released=False)

    def _handle_conn_close(self, event: evt.Event) -> None:
        # Normally EVT_RELEASED/EVT_ABORTED already reported it (or is about to: the close can
        # race the association thread).  A connection lost without either is reported later.
        assoc = event.assoc
        if assoc.is_acceptor and not (assoc.is_established or assoc.is_released or assoc.is_aborted
                                      or assoc.is_rejected):
            # The peer hung up before sending an A-ASSOCIATE-RQ (a port probe, a health check, a
            # client that gave up).  pynetdicom would keep the association thread - and one of
            # ``max_associations`` slots - waiting ``acse_timeout`` for a request that cannot
            # come; an empty item ends its wait now (it then cleans up as after a timeout).
            cast(Any, assoc.dul.to_user_queue).put(None)
            return
        with self._lock:
            if id(assoc) not in self._states:
                return

        def finish() -> None:
            self._end(assoc, released=bool(assoc.is_released))

        timer = threading.Timer(1.0, finish)
        timer.daemon = True
        timer.start()

    def _tls_failed(self, address: Any, exc: Exception) -> None:
        self._log.warning("tls_handshake_failed", peer=str(address), error=str(exc))

    # -- services ------------------------------------------------------------------------------
    def _handle_echo(self, event: evt.Event) -> int:
        """Handle a C-ECHO request: always ``0x0000`` (Success)."""
        self._state(event.assoc).log.debug("echo_answered")
        return statuses.SUCCESS

    def _handle_store(self, event: evt.Event) -> int:
        """Handle a C-STORE request: spool the dataset as received, then report it.

        Contract (like pynetdicom's ``doc_handle_store``):

        **Attributes used**: the request's *Affected SOP Class UID* and *Affected SOP Instance
        UID*; the presentation context's transfer syntax; from the dataset header only
        *SOP Class UID*, *SOP Instance UID*, *Study Instance UID*, *Series Instance UID* and
        :data:`~dicom_node.ingest.CATALOG_ATTRIBUTES` (parsing stops before the pixel data).

        **Statuses returned**

        - ``0x0000`` Success: the file is fsync'd in the spool and the sink was told.
        - ``0xA700`` Refused, out of resources: free space below ``storage.min_free_mb``
          (nothing written) or the write failed.
        - ``0xA900`` Error, dataset does not match SOP class: the dataset's SOP Class/Instance
          UID differs from the request's, or a UID is missing, invalid, > 64 characters or
          holds ``../`` (it would become a path part).
        - ``0xC210`` Error, cannot understand: the dataset could not be decoded.
        - ``0xC211`` Error, processing failure: anything unexpected (traceback logged).
        """
        received_at = time.time()
        state = self._state(event.assoc)
        req = cast(C_STORE, event.request)
        log = state.log.bind(sop_instance_uid=str(req.AffectedSOPInstanceUID or "")[:80])
        try:
            status = self._store(event, state, received_at)
        except _Refused as refused:
            log.warning(refused.event, status=f"0x{refused.status:04X}", **refused.fields)
            status = refused.status
        except Exception:
            log.exception("store_failed", status=f"0x{statuses.PROCESSING_FAILURE:04X}")
            status = statuses.PROCESSING_FAILURE
        if self.metrics is not None:
            self.metrics.store_status(status)
        return status

    def _store(self, event: evt.Event, state: _AssociationState, received_at: float) -> int:
        req = cast(C_STORE, event.request)
        free = self.spool.free_mb()
        if free < self.storage.min_free_mb:
            raise _Refused(
                statuses.OUT_OF_RESOURCES, "store_refused_low_disk",
                free_mb=round(free, 1), min_free_mb=self.storage.min_free_mb,
            )
        transfer_syntax = str(event.context.transfer_syntax)
        abstract_syntax = str(event.context.abstract_syntax)
        raw = cast(BytesIO, req.DataSet)
        try:
            found, attributes = parse_header(raw, transfer_syntax)
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
        affected_class = str(req.AffectedSOPClassUID or "")
        affected_instance = str(req.AffectedSOPInstanceUID or "")
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
        try:
            study = validate_uid(str(found["StudyInstanceUID"] or ""), "StudyInstanceUID")
            series = validate_uid(str(found["SeriesInstanceUID"] or ""), "SeriesInstanceUID")
            validate_uid(sop_instance, "SOPInstanceUID")
        except InvalidUIDError as exc:
            raise _Refused(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "store_refused_invalid_uid",
                error=str(exc),
            ) from None
        meta = file_meta_bytes(sop_class, sop_instance, transfer_syntax, state.calling_ae_title)
        with raw.getbuffer() as body:
            size = len(meta) + len(body)
            try:
                path = self.spool.store(study, series, sop_instance, [meta, body])
            except SpoolWriteError as exc:
                raise _Refused(statuses.OUT_OF_RESOURCES, "store_refused_write_failed",
                               error=str(exc)) from None
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
        self.sink.instance_stored(instance)
        if self.metrics is not None:
            self.metrics.instance_received(state.calling_ae_title, size)
        state.series.add(series)
        state.stored += 1
        return statuses.SUCCESS

