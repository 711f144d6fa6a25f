"""The intake journal: one cheap durable write per received instance before C-STORE success.

Why: making a *new* file durable costs two journal commits of the filesystem (the file with its
new blocks, then the folder entry): ~0.75 ms per CT image on ext4 here, the largest single cost
of a C-STORE.  Overwriting blocks that already exist and are initialised needs no metadata at
all - ``pwrite`` + ``fdatasync`` of 0.5 MB measured 0.35 ms.  So each instance is first
appended to a preallocated, zero-filled journal file and ``fdatasync``'d; that is the moment the
node may answer success.  Parallel associations share flushes (group commit: one ``fdatasync``
covers every record written before it began), which matters on disks whose flush is slow
whatever is written (4 ms on another virtual disk here, even with nothing dirty).

Once the answer is sent, the association's thread writes the instance to its spool file without
waiting for the disk (the bytes are still in the CPU's cache) and tells the ingest sink; a
background thread fsyncs a whole batch of files and folders at once, and only then marks the
batch *applied* in the journal header. After a crash, :meth:`IntakeJournal.recover` finds
the records that were not applied and :class:`Intake` writes their files again before the
listener opens its port.

File layout (``<spool>/.journal/intake.wal``), little endian, everything page (4 KiB) aligned:

* page 0, the header: ``b"DNJH"``, version, *applied* sequence number (every record up to it is
  in the spool, fsync'd), bytes zero-filled so far;
* then records, each on a page boundary: ``b"DNJR"``, sequence number, length of the metadata
  (JSON: the instance's UIDs and catalog attributes) and of the file bytes, CRC-32 of all of it;
  then the metadata, the file bytes and zero padding to the next page.

The file is a ring: a record never goes over one that is not applied yet.  The spool files are
fsync'd (and their records applied) when the stream pauses (0.5 s without an instance), when
half the journal holds unapplied records, or after 30 s: during a burst only the journal writes
reach the disk, the spool files follow in one batch.  When the journal has no room (a disk too
slow for a long stream) or a record does not fit, the instance is written and fsync'd straight
into the spool instead, as without a journal: slower, never lost.  Recovery scans every page
for a valid record newer than *applied* (a record torn by the crash fails its CRC; it was never
acknowledged).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Final, NamedTuple, cast

import structlog

from dicom_node.ingest import AssociationSummary, IngestSink, StoredInstance
from dicom_node.spool import BytesLike, FilesystemSync, Spool, SpoolWriteError, fsync_dir

log = structlog.get_logger(__name__)

PAGE: Final = 4096
_HEADER = struct.Struct("<4sIQQ")
_HEADER_MAGIC: Final = b"DNJH"
_VERSION: Final = 1
_RECORD = struct.Struct("<4sQIII")
_RECORD_MAGIC: Final = b"DNJR"
_ZERO_CHUNK: Final = 8 << 20
#: The spool files are fsync'd (and their records applied) after this long without an instance,
SYNC_WHEN_IDLE_S: Final = 0.5
#: when this share of the journal holds records not yet applied,
SYNC_WHEN_FULL: Final = 0.5
#: or at the latest this long after the oldest unapplied one was written.
SYNC_AFTER_S: Final = 30.0


def _pad(length: int) -> int:
    return -(-length // PAGE) * PAGE


def _crc32_function() -> Callable[[BytesLike, int], int]:
    """CRC-32 (the zlib polynomial, same values): libdeflate's through imagecodecs, 11 us for a
    0.5 MB CT image here against zlib's 125 us, on the path of every C-STORE response."""
    try:
        from imagecodecs import deflate_crc32
    except ImportError:  # an imagecodecs built without libdeflate
        return zlib.crc32
    return cast("Callable[[BytesLike, int], int]", deflate_crc32)


_crc32 = _crc32_function()


def _crc(seq: int, meta: bytes, chunks: Sequence[BytesLike]) -> int:
    crc = _crc32(struct.pack("<QII", seq, len(meta), sum(len(c) for c in chunks)), 0)
    crc = _crc32(meta, crc)
    for chunk in chunks:
        crc = _crc32(chunk, crc)
    return crc


class IntakeJournal:
    """The journal file: reserve, write and apply records; recover them after a crash.

    Parameters
    ----------
    path : Path
        The journal file (created, with its folder, when missing).
    size_bytes : int
        Its size; the part not yet zero-filled is filled by a background thread, and records
        only go where the filling is done (until then instances take the direct path).
    """

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = Path(path)
        self.size = max(_pad(size_bytes), 2 * PAGE)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()
        #: Serialises header writes, so the values on disk only ever grow.
        self._header_lock = threading.Lock()
        # Group commit: writes done (a ticket each), tickets covered by a finished fdatasync,
        # tickets known durable, one fdatasync at a time, and the ranges (lo, hi] of tickets
        # whose fdatasync failed (a later successful one must not pass them as durable).
        self._sync_cv = threading.Condition()
        self._tickets = 0
        self._handled = 0
        self._synced = 0
        self._syncing = False
        self._failed: list[tuple[int, int]] = []
        raw = os.pread(self._fd, _HEADER.size, 0)
        has_header = len(raw) == _HEADER.size and raw[:4] == _HEADER_MAGIC
        if has_header:
            _, _version, applied, ready = _HEADER.unpack(raw)
            self.applied: int = int(applied)
            self._ready: int = min(int(ready), os.fstat(self._fd).st_size)
        else:
            self.applied, self._ready = 0, PAGE
        self._header_ready = self._ready
        if not has_header:
            self._write_header()
        self._next_seq = self.applied + 1
        self._offset = PAGE
        #: Records written (or being written) and not yet applied: seq -> (offset, size).
        self._outstanding: dict[int, tuple[int, int]] = {}
        self._outstanding_bytes = 0
        self._closed = False
        self._filler: threading.Thread | None = None

    # -- header and zero fill ------------------------------------------------------------------
    def _write_header(self, ready: int | None = None) -> None:
        """Write the header with the current *applied* mark (and ``ready`` when given) durably."""
        with self._header_lock:
            self._header_ready = max(self._header_ready, ready or 0)
            header = _HEADER.pack(_HEADER_MAGIC, _VERSION, self.applied, self._header_ready)
            os.pwrite(self._fd, header.ljust(PAGE, b"\0"), 0)
        self._make_durable()

    def _make_durable(self) -> None:
        """Return once every write this thread finished before the call is on disk.

        Group commit: one ``fdatasync`` at a time covers every write finished before it began,
        so parallel associations share the disk's flush (4 ms on some virtual disks) instead
        of queueing one flush each.  A write finished while a flush runs waits for the next.

        Raises
        ------
        OSError
            When the ``fdatasync`` that covered this write failed.  Its error is not retried:
            after a failed flush Linux may report the next one clean without the data on disk.
        """
        with self._sync_cv:
            self._tickets += 1
            ticket = self._tickets
            while True:
                if any(lo < ticket <= hi for lo, hi in self._failed):
                    raise OSError(f"fdatasync of {self.path} failed")
                if self._synced >= ticket:
                    return
                if self._syncing:
                    self._sync_cv.wait()
                    continue
                self._syncing = True
                lo, covered = self._handled, self._tickets
                error: OSError | None = None
                self._sync_cv.release()
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    error = exc
                finally:
                    self._sync_cv.acquire()
                self._handled = max(self._handled, covered)
                if error is None:
                    self._synced = max(self._synced, covered)
                else:
                    self._failed.append((lo, covered))
                self._syncing = False
                self._sync_cv.notify_all()
                if error is not None:
                    raise error

    def start_filling(self) -> None:
        """Zero-fill the rest of the file in a background thread (records only go where filled)."""
        if self._ready >= self.size or self._filler is not None:
            return
        self._filler = threading.Thread(target=self._fill, name="journal-fill", daemon=True)
        self._filler.start()

    def _fill(self) -> None:
        zeros = bytes(_ZERO_CHUNK)
        try:
            while not self._closed and self._ready < self.size:
                n = min(_ZERO_CHUNK, self.size - self._ready)
                os.pwrite(self._fd, zeros[:n], self._ready)
                self._make_durable()
                # Records may go there once the header that says so is on disk.
                self._write_header(ready=self._ready + n)
                with self._lock:
                    self._ready += n
        except OSError as exc:
            log.warning("journal_fill_failed", path=str(self.path), error=str(exc))
        else:
            log.info("journal_ready", path=str(self.path), size_mb=self.size >> 20)

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest record written (0: none since it was made)."""
        return self._next_seq - 1

    @property
    def ready_bytes(self) -> int:
        """How much of the file is zero-filled and usable for records."""
        return self._ready

    # -- writing -------------------------------------------------------------------------------
    def append(self, meta: bytes, chunks: Sequence[BytesLike]) -> int | None:
        """Write a record durably and return its sequence number; None when there is no room.

        Raises
        ------
        OSError
            When the write or ``fdatasync`` fails (the record is void; nothing was promised).
        """
        length = _RECORD.size + len(meta) + sum(len(c) for c in chunks)
        size = _pad(length)
        with self._lock:
            if self._closed:
                return None
            offset = self._offset if self._offset + size <= self._ready else PAGE  # ring
            # Never over a record that is not applied yet (the nearest one ahead of us).
            ahead = [o for o, _ in self._outstanding.values() if o >= offset]
            if offset + size > (min(ahead) if ahead else self._ready):
                return None
            seq = self._next_seq
            self._next_seq += 1
            self._offset = offset + size
            self._outstanding[seq] = (offset, size)
            self._outstanding_bytes += size
        header = _RECORD.pack(_RECORD_MAGIC, seq, len(meta), length - _RECORD.size - len(meta),
                              _crc(seq, meta, chunks))
        try:
            os.pwritev(self._fd, [header, meta, *chunks, bytes(size - length)], offset)
            self._make_durable()
        except OSError:
            self.applied_through([seq])  # void: it must not hold back the applied mark
            raise
        return seq

    def applied_through(self, seqs: Sequence[int]) -> None:
        """Mark records as safely in the spool; advance and persist the *applied* mark."""
        with self._lock:
            for seq in seqs:
                _, size = self._outstanding.pop(seq, (0, 0))
                self._outstanding_bytes -= size
            mark = min(self._outstanding) - 1 if self._outstanding else self._next_seq - 1
            advance = mark > self.applied and not self._closed
            if advance:
                self.applied = mark
        if advance:
            # Outside the lock: associations keep appending while the header is flushed.
            self._write_header()

    @property
    def outstanding_fraction(self) -> float:
        """Share of the journal held by records not yet applied."""
        return self._outstanding_bytes / max(self._ready - PAGE, 1)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> list[tuple[int, dict[str, object], bytes]]:
        """Records newer than *applied* with a valid CRC, oldest first: (seq, metadata, bytes).

        Call before any :meth:`append`; sequence numbers given out afterwards are larger than
        any valid record's in the file.
        """
        found: list[tuple[int, dict[str, object], bytes]] = []
        highest = self.applied
        offset = PAGE
        while offset + _RECORD.size <= self._ready:
            raw = os.pread(self._fd, _RECORD.size, offset)
            magic, seq, meta_len, data_len, crc = _RECORD.unpack(raw)
            length = _RECORD.size + meta_len + data_len
            if magic != _RECORD_MAGIC or offset + length > self._ready:
                offset += PAGE
                continue
            if seq > self.applied:
                body = os.pread(self._fd, meta_len + data_len, offset + _RECORD.size)
                meta, data = body[:meta_len], body[meta_len:]
                if len(body) == meta_len + data_len and _crc(seq, meta, [data]) == crc:
                    highest = max(highest, seq)
                    try:
                        found.append((seq, json.loads(meta), data))
                    except ValueError:
                        log.warning("journal_record_unreadable", seq=seq, offset=offset)
                    offset += _pad(length)
                    continue
            # An old (applied) record, a torn one, or bytes that only look like a header: step
            # one page, so a valid record written over part of an old one is not skipped.
            offset += PAGE
        self._next_seq = highest + 1
        return sorted(found, key=lambda r: r[0])

    def reset_after_recovery(self) -> None:
        """Everything recovered is in the spool: mark all applied, write from the top again."""
        with self._lock:
            self.applied = self._next_seq - 1
            self._offset = PAGE
            self._write_header()

    def close(self) -> None:
        """Stop the zero fill and close the file (after the intake has applied everything)."""
        with self._lock:
            self._closed = True
        if self._filler is not None:
            self._filler.join(30)
        with self._lock:
            with contextlib.suppress(OSError):
                self._write_header()
            os.close(self._fd)



class Pending(NamedTuple):
    """An instance durable in the journal whose spool file is still to be written
    (:meth:`Intake.finish`)."""

    seq: int
    instance: StoredInstance
    chunks: list[BytesLike]


_META_FIELDS: Final = tuple(f.name for f in fields(StoredInstance) if f.name != "path")


def _instance_meta(instance: StoredInstance) -> bytes:
    # Not dataclasses.asdict: it deep-copies (~30 us per instance on the C-STORE path).
    return json.dumps({name: getattr(instance, name) for name in _META_FIELDS},
                      separators=(",", ":")).encode()


class Intake:
    """Makes received instances durable, writes them to the spool and reports them in order.

    With a journal, :meth:`store` returns once the journal record is on disk (the moment the
    C-STORE may be answered) and :meth:`finish`, called by the same association thread once
    the answer is sent, writes the spool file while the bytes are still in the CPU's cache,
    tells the sink and leaves the file to the sync thread: it makes a whole batch of files
    durable with one ``syncfs`` when the stream pauses and only then marks their records
    applied.  Without a journal (``journal=None``, or when it has no room) :meth:`store` writes
    and fsyncs the spool file itself and tells the sink.  Either way the sink hears of an
    association's instances on the association's own thread, so before the end of that
    association.
    """

    def __init__(self, spool: Spool, sink: IngestSink, journal: IntakeJournal | None) -> None:
        self.spool = spool
        self.sink = sink
        self.journal = journal
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Spool files written and not yet synced, with their records' sequence numbers (only
        # the sync thread takes them away); guarded by _cv, which also wakes the sync thread and
        # flush().
        self._cv = threading.Condition()
        self._unsynced: list[tuple[Path, int]] = []
        self._oldest = 0.0
        #: Instances answered from the journal whose spool file is not written and reported yet.
        self._unfinished = 0
        #: Made when the sync thread starts, before any write it is to report errors of.
        self._fs_sync: FilesystemSync | None = None

    def start(self) -> int:
        """Write back what the journal holds from before a crash; start the sync thread.

        Returns how many instances were recovered from the journal.
        """
        recovered = 0
        if self.journal is not None:
            try:
                self._fs_sync = FilesystemSync(self.spool.root)
            except OSError as exc:
                log.warning("spool_syncfs_unavailable", error=str(exc))
            for seq, fields, data in self.journal.recover():
                try:
                    instance = StoredInstance(**{  # type: ignore[arg-type]
                        **fields,
                        "path": self.spool.path_for(
                            str(fields["study_instance_uid"]), str(fields["series_instance_uid"]),
                            str(fields["sop_instance_uid"]),
                        ),
                    })
                    self.spool.store_at(instance.path, data)
                except (TypeError, ValueError, SpoolWriteError) as exc:
                    log.error("journal_recovery_failed", seq=seq, error=str(exc))
                    continue
                self._report(instance)
                recovered += 1
            self.journal.reset_after_recovery()
            if recovered:
                log.warning("journal_recovered", instances=recovered, path=str(self.journal.path))
            self.journal.start_filling()
            self._thread = threading.Thread(target=self._run, name="intake-sync", daemon=True)
            self._thread.start()
        return recovered

    def stop(self) -> None:
        """Sync and apply every spool file written, then stop (call after the associations
        ended: an instance finished later stays in the journal for the next start)."""
        if self._thread is not None:
            self._stopping.set()
            with self._cv:
                self._cv.notify_all()
            self._thread.join(120)
            self._thread = None
        if self.journal is not None:
            self.journal.close()
        if self._fs_sync is not None:
            self._fs_sync.close()
            self._fs_sync = None

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the sink has heard of everything stored so far (not that it is fsync'd
        in the spool: it is durable in the journal already)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._unfinished == 0, timeout)

    # -- called from association threads -------------------------------------------------------
    def store(
        self, instance: StoredInstance, chunks: list[BytesLike], *, direct: bool = False
    ) -> Pending | None:
        """Make ``instance`` (its file bytes in ``chunks``) durable; return when it is.

        Returns what :meth:`finish` must be given once the answer is sent when the instance
        went to the journal; None when it was written (and fsync'd) to the spool directly and
        reported already: with ``direct``, without a journal, or when it has no room.

        Raises
        ------
        SpoolWriteError
            When it could not be made durable (nothing was promised).
        """
        if self.journal is not None and self._thread is not None and not direct:
            try:
                seq = self.journal.append(_instance_meta(instance), chunks)
            except OSError as exc:
                log.warning("journal_write_failed", error=str(exc))
                seq = None
            if seq is not None:
                with self._cv:
                    self._unfinished += 1
                return Pending(seq, instance, chunks)
        self.spool.store_at(instance.path, chunks)
        self._report(instance)
        return None

    def finish(self, pending: Pending) -> None:
        """Write the spool file of an instance :meth:`store` put in the journal, tell the sink,
        and leave the file to the sync thread.  Retries while the disk refuses (the sender has
        its answer; this association waits, the others go on) until the intake stops: the
        instance then stays in the journal and is written at the next start."""
        try:
            path = self._write(pending.instance, pending.chunks)
        except SpoolWriteError:
            path = None
        if path is not None:
            self._report(pending.instance)
        journal = self.journal
        assert journal is not None
        with self._cv:
            self._unfinished -= 1
            if path is not None:
                if not self._unsynced:
                    self._oldest = time.monotonic()
                self._unsynced.append((path, pending.seq))
            # Wake the sync thread for a new batch, a journal filling up, or flush().
            if len(self._unsynced) == 1 or self._unfinished == 0 or (
                journal.outstanding_fraction > SYNC_WHEN_FULL
            ):
                self._cv.notify_all()

    def association_ended(self, summary: AssociationSummary) -> None:
        """Tell the sink, after every instance of the association (same thread)."""
        try:
            self.sink.association_ended(summary)
        except Exception:
            log.exception("sink_failed", sink_event="association_ended")

    def _report(self, instance: StoredInstance) -> None:
        try:
            self.sink.instance_stored(instance)
        except Exception:
            log.exception("sink_failed", sink_event="instance_stored")

    # -- the sync thread -----------------------------------------------------------------------
    def _run(self) -> None:
        """Sync the spool files written when the stream pauses (``SYNC_WHEN_IDLE_S`` without a
        new one), when the journal is half full of unapplied records, after ``SYNC_AFTER_S``,
        or when stopping; then mark their records applied."""
        journal = self.journal
        assert journal is not None
        while True:
            with self._cv:
                while True:
                    stopping = self._stopping.is_set()
                    if not self._unsynced:
                        if stopping:
                            return
                        self._cv.wait()
                        continue
                    if (
                        stopping
                        or journal.outstanding_fraction > SYNC_WHEN_FULL
                        or time.monotonic() - self._oldest > SYNC_AFTER_S
                    ):
                        break
                    written = len(self._unsynced)
                    self._cv.wait(SYNC_WHEN_IDLE_S)
                    if len(self._unsynced) == written:
                        break  # the stream paused
                batch, self._unsynced = self._unsynced, []
            if self._sync([path for path, _ in batch]):
                journal.applied_through([seq for _, seq in batch])

    def _write(self, instance: StoredInstance, chunks: list[BytesLike]) -> Path:
        """Write the spool file (no fsync yet), retrying while the disk refuses."""
        while True:
            try:
                return self.spool.store_at(instance.path, chunks, sync=False)
            except SpoolWriteError as exc:
                # Safe in the journal; keep trying (it is written again at the next start).
                log.error("journal_apply_failed", sop_instance_uid=instance.sop_instance_uid,
                          error=str(exc))
                if self._stopping.wait(1.0):
                    raise

    def _sync(self, paths: list[Path]) -> bool:
        """Make a batch of spool files and their folders durable; False (logged) on failure.

        One ``syncfs`` when the files are all on the spool's filesystem, else an ``fsync`` per
        file then per folder (the first one does most of the work).  After a failure the batch
        is not applied: its records stay in the journal and are written again at the next start
        (a second ``fsync`` cannot be trusted: Linux may report it clean with the data lost).
        """
        folders = {p.parent for p in paths}
        try:
            fs = self._fs_sync
            if fs is not None and fs.available and all(fs.covers(folder) for folder in folders):
                fs.sync()
                return True
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # removed meanwhile (retention); nothing left to make durable
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for folder in folders:
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(folder)
        except OSError as exc:
            log.error("spool_sync_failed", instances=len(paths), error=str(exc),
                      hint="they stay in the intake journal and are written again at the next start")
            return False
        return True
