"""The catalog side of the ingest boundary: records stored instances off the association thread.

The listener hands each durably stored instance to :class:`CatalogRecorder`; a background
thread writes them to the catalog in batches (one transaction per batch), so a C-STORE
response never waits for the database.  An instance that is fsync'd but not yet recorded when
the process dies is found again by :func:`reconcile_spool` at the next start.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TypeVar

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.catalog import Catalog
from dicom_node.catalog.known import KnownUids
from dicom_node.ingest.events import CATALOG_ATTRIBUTES, AssociationSummary, CommitmentReport, StoredInstance

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

#: Waits between attempts at one catalog write (another writer's lock or a concurrent insert of
#: the same series, a dropped database connection): about 6 s in all, then the write is given up
#: (logged; the spool keeps the files and :func:`reconcile_spool` records them at the next start).
RETRY_DELAYS_S: tuple[float, ...] = (0.05, 0.2, 1.0, 2.0, 3.0)


class CatalogRecorder:
    """An :class:`~dicom_node.ingest.IngestSink` that batches writes into the catalog."""

    def __init__(self, catalog: Catalog, *, late_policy: str = "reprocess", max_batch: int = 500,
                 linger_s: float = 0.05, on_reopened: Callable[[list[str]], None] | None = None,
                 on_premature: Callable[[str], None] | None = None) -> None:
        self.catalog = catalog
        #: Told the calling AE title of each premature completion (a metric).
        self.on_premature = on_premature
        #: Series each open association carried so far (recorder thread only): the catalog
        #: counts open associations per series, so the idle timer waits for a slow sender.
        self._open: dict[str, set[str]] = {}
        #: How long a batch waits for more instances before it is written: one transaction (one
        #: database commit, i.e. one fsync) per ~50 ms instead of one per instance.
        self.linger_s = linger_s
        self.late_policy = late_policy
        self.max_batch = max_batch
        self.on_reopened = on_reopened
        #: Handed over, not yet taken by the recorder thread; only the first of a batch wakes it
        #: (a wake-up per instance cost the association threads GIL hand-overs).
        self._items: list[object] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="catalog-recorder", daemon=True)
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        #: Instances re-sent although already stored, per association id and series UID; logged
        #: once per association when it ends (``instances_already_stored``).
        self._already: dict[str, dict[str, int]] = {}
        #: SOP Instance UID -> (study, series) of recently claimed instances (not all written to
        #: the catalog yet); bounded, the catalog answers for older ones.
        self._claims: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._claims_lock = threading.Lock()
        #: Every SOP Instance UID the catalog may hold (see :mod:`dicom_node.catalog.known`):
        #: a claim of a UID not in it needs no catalog query.  Built by :meth:`start`; grown
        #: under ``_claims_lock``.
        self._known: KnownUids | None = None

    def start(self, known_uids: Collection[str] | None = None) -> None:
        """Start the recorder thread.  ``known_uids``: every SOP Instance UID in the catalog
        (``serve`` has them from :func:`reconcile_spool`); else they are read from the catalog.
        Instances written to the catalog other than through this recorder after this call are
        not seen by the duplicate check's filter (``serve`` writes them all through it)."""
        if known_uids is None:
            known_uids = self.catalog.known_sop_instance_uids()
        known = KnownUids.of(known_uids)
        with self._claims_lock:  # claimed before the start (not in the catalog yet)
            for uid in self._claims:
                known.add(uid)
            self._known = known
        log.info("known_instances_indexed", instances=len(known_uids), filter_bytes=known.nbytes)
        self._thread.start()

    def stop(self) -> None:
        """Write what was handed over, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    #: Recent claims kept in memory (about 200 bytes each).
    MAX_CLAIMS = 50_000

    def claim(self, study_instance_uid: str, series_instance_uid: str,
              sop_instance_uid: str) -> tuple[str, str] | None:
        """:class:`~dicom_node.ingest.events.InstanceClaims`: refuse a SOP Instance UID that is
        already stored (or being stored) in another study or series.

        An instance UID is unique worldwide; two series claiming one are a sender's error (or
        an attack).  Storing the second would point the catalog row of the first patient's
        instance at the second patient's file.  One lock makes concurrent associations agree.

        The catalog is asked outside the lock (a SELECT held under it serialised every
        association behind one query); the claims are read again under the lock before
        deciding, so two associations racing for one UID still agree on a single owner.
        """
        wanted = (study_instance_uid, series_instance_uid)
        with self._claims_lock:
            owner = self._claims.get(sop_instance_uid)
            if owner is not None:
                return self._settle(sop_instance_uid, wanted, owner)
        known = self._known
        if known is not None and sop_instance_uid not in known:
            stored = None  # never stored: the catalog has nothing to say
        else:
            stored = self.catalog.owner_of_instance(sop_instance_uid)
        with self._claims_lock:
            return self._settle(sop_instance_uid, wanted, self._claims.get(sop_instance_uid) or stored)

    def _settle(self, sop_instance_uid: str, wanted: tuple[str, str],
                owner: tuple[str, str] | None) -> tuple[str, str] | None:
        """Under the claims lock: the other owner, or None having claimed the UID for ``wanted``."""
        if owner is not None and owner != wanted:
            return owner
        if self._known is not None and sop_instance_uid not in self._claims:
            self._known.add(sop_instance_uid)  # before the claim can be forgotten (MAX_CLAIMS)
        self._claims[sop_instance_uid] = wanted
        self._claims.move_to_end(sop_instance_uid)
        while len(self._claims) > self.MAX_CLAIMS:
            self._claims.popitem(last=False)
        return None

    # IngestSink
    def instance_stored(self, instance: StoredInstance) -> None:
        self._put(instance)

    def association_ended(self, summary: AssociationSummary) -> None:
        self._put(summary)

    def commitment_reported(self, report: CommitmentReport) -> str:
        """:class:`~dicom_node.ingest.events.CommitmentSink`: keep the report in the catalog now,
        on the association's thread, so the archive hears success only once it is durable (a
        rare, small write; the node's commitment loop applies it)."""
        from dicom_node.catalog import commitments

        return commitments.record_report(self.catalog, report.transaction_uid, report.committed, report.failed,
                                         report.received_at)

    def _put(self, item: object) -> None:
        with self._cv:
            self._pending += 1
            self._idle.clear()
            self._items.append(item)
            if len(self._items) == 1:
                self._cv.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything handed over so far is in the catalog."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._items or self._stopping)
                if not self._items:
                    return  # stopping, and everything is written
                # Let the batch fill (only stop() wakes this wait), then take all of it.
                self._cv.wait_for(lambda: self._stopping, timeout=self.linger_s)
                batch, self._items = self._items, []
            for start in range(0, len(batch), self.max_batch):
                self._write(batch[start:start + self.max_batch])

    def _write(self, batch: list[object]) -> None:
        # Keep order: instances before the association end that follows them.
        instances: list[StoredInstance] = []
        try:
            for item in batch:
                if isinstance(item, StoredInstance):
                    instances.append(item)
                elif isinstance(item, AssociationSummary):
                    self._attempt(self._record_instances, instances)
                    instances = []
                    self._attempt(self._record_association, item)
                    self._report_already_stored(item)
            self._attempt(self._record_instances, instances)
        except Exception:  # process boundary: the thread must survive a database hiccup
            log.exception("catalog_write_failed", batch=len(batch))
        finally:
            with self._cv:
                self._pending -= len(batch)
                if self._pending <= 0:
                    self._pending = 0
                    self._idle.set()

    def _report_already_stored(self, summary: AssociationSummary) -> None:
        """One log line per series for the instances an association re-sent: they replace the
        stored files but start no job (``dicom-node reprocess`` or ``rerun`` does)."""
        for uid, count in sorted(self._already.pop(summary.association_id, {}).items()):
            series = self.catalog.get_series(uid)
            log.info("instances_already_stored", count=count, series_instance_uid=uid,
                     calling_ae_title=summary.calling_ae_title,
                     series_state=series.state if series else None,
                     message=f"{count} already-stored instances ignored (no new job); "
                             "'dicom-node reprocess' re-evaluates the rules")

    @staticmethod
    def _attempt(write: Callable[[_T], object], arg: _T) -> None:
        """Run one catalog write (a transaction: all or nothing, and idempotent), retrying."""
        for delay in (*RETRY_DELAYS_S, None):
            try:
                write(arg)
                return
            except Exception as exc:
                if delay is None:
                    raise
                log.warning("catalog_write_retry", error=str(exc).splitlines()[0][:200], retry_in_s=delay)
                time.sleep(delay)

    def _record_association(self, summary: AssociationSummary) -> None:
        closed = self._open.get(summary.association_id, set())
        self.catalog.record_association(summary, closed)
        self._open.pop(summary.association_id, None)

    def _record_instances(self, instances: list[StoredInstance]) -> None:
        if not instances:
            return
        opened: dict[str, int] = {}
        new_pairs: list[tuple[str, str]] = []
        for inst in instances:
            if not inst.association_id:
                continue  # recovered from the spool: no association
            carried = self._open.get(inst.association_id)
            if carried is None or inst.series_instance_uid not in carried:
                if (inst.association_id, inst.series_instance_uid) not in new_pairs:
                    new_pairs.append((inst.association_id, inst.series_instance_uid))
                    opened[inst.series_instance_uid] = opened.get(inst.series_instance_uid, 0) + 1
        if self._known is not None:
            # Claimed instances are in the filter already (``_settle``); one that reached the
            # recorder without a claim goes in before it reaches the catalog.
            with self._claims_lock:
                for inst in instances:
                    if inst.sop_instance_uid not in self._claims:
                        self._known.add(inst.sop_instance_uid)
        premature: list[tuple[str, str]] = []
        counts: dict[str, int] = {}
        reopened = self.catalog.record_instances(instances, late_policy=self.late_policy, opened=opened,
                                                 premature=premature, already_stored=counts)
        if counts:
            by_series = {i.series_instance_uid: i.association_id for i in instances}
            for uid, n in counts.items():
                per_assoc = self._already.setdefault(by_series[uid], {})
                per_assoc[uid] = per_assoc.get(uid, 0) + n
        # Only once the transaction is in (a retried write must not count twice).
        for assoc, series in new_pairs:
            self._open.setdefault(assoc, set()).add(series)
        if self.on_premature:
            for _uid, ae in premature:
                self.on_premature(ae)
        if reopened:
            log.info("series_reopened_by_late_instances", series=reopened)
            if self.on_reopened:
                self.on_reopened(reopened)


def instance_from_file(path: Path, *, calling_ae_title: str = "", association_id: str = "") -> StoredInstance:
    """Describe a spooled file as a :class:`StoredInstance` (headers only, pixels not read)."""
    ds = dcmread(path, stop_before_pixels=True)
    attrs: dict[str, str | int | float] = {}
    for key in CATALOG_ATTRIBUTES:
        value = ds.get(key)
        if value is None or value == "":
            continue
        attrs[key] = value if isinstance(value, int | float) else str(value)
    return StoredInstance(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        size=path.stat().st_size,
        calling_ae_title=calling_ae_title,
        association_id=association_id,
        received_at=path.stat().st_mtime,
        attributes=attrs,
    )


def reconcile_spool(catalog: Catalog, paths: Iterable[Path], known: set[str] | None = None) -> int:
    """Record spooled instances the catalog does not know (the process died between the
    fsync and the catalog write).  Returns how many were added.

    ``known``: the catalog's SOP Instance UIDs, read by the caller (else here); the recovered
    ones are added to it, so it can go on to :meth:`CatalogRecorder.start`."""
    if known is None:
        known = catalog.known_sop_instance_uids()
    missing = []
    for path in paths:
        if path.stem in known:
            continue
        try:
            missing.append(instance_from_file(path, calling_ae_title="(recovered)"))
        except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            log.warning("spool_file_unreadable", path=str(path), error=str(exc))
    for start in range(0, len(missing), 500):
        catalog.record_instances(missing[start:start + 500])
    known.update(i.sop_instance_uid for i in missing)
    if missing:
        log.info("spool_reconciled", recovered=len(missing))
    return len(missing)
