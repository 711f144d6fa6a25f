"""The intake journal: durable records, recovery after a crash, wrap-around, fallback when full."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import dicom_node.journal as journal_module
from dicom_node.ingest import AssociationSummary, StoredInstance
from dicom_node.journal import PAGE, Intake, IntakeJournal
from dicom_node.spool import FilesystemSync, Spool, SpoolWriteError

STUDY, SERIES = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.2"


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def instance_stored(self, instance: StoredInstance) -> None:
        assert instance.path.is_file(), "reported before the spool file exists"
        self.events.append(("instance", instance.sop_instance_uid))

    def association_ended(self, summary: AssociationSummary) -> None:
        self.events.append(("ended", summary.association_id))


def _instance(spool: Spool, n: int) -> StoredInstance:
    sop = f"{SERIES}.{n}"
    return StoredInstance(
        study_instance_uid=STUDY, series_instance_uid=SERIES, sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=spool.path_for(STUDY, SERIES, sop), size=0, calling_ae_title="CT1",
        association_id="a1", received_at=1700000000.0 + n, attributes={"Modality": "CT", "InstanceNumber": n},
    )


def _payload(n: int, size: int = 70_000) -> bytes:
    return (f"instance {n} ".encode() * (size // 10 + 1))[:size]


def _store(intake: Intake, instance: StoredInstance, chunks: list[bytes]) -> None:
    """What the listener does for one C-STORE: store, answer (here: nothing), finish."""
    pending = intake.store(instance, list(chunks))
    if pending is not None:
        intake.finish(pending)


def _filled(path: Path, size: int) -> IntakeJournal:
    journal = IntakeJournal(path, size)
    journal.start_filling()
    deadline = time.monotonic() + 30
    while journal.ready_bytes < journal.size:
        assert time.monotonic() < deadline, "zero fill did not finish"
        time.sleep(0.01)
    return journal


def test_records_newer_than_applied_are_recovered_and_torn_ones_are_not(tmp_path: Path) -> None:
    path = tmp_path / "j.wal"
    journal = _filled(path, 1 << 20)
    seqs = [journal.append(f'{{"n": {n}}}'.encode(), [b"head", _payload(n)]) for n in range(4)]
    assert seqs == [1, 2, 3, 4]
    journal.applied_through([1])
    assert journal.applied == 1
    # Tear record 3: flip one byte in its data, as a crash in mid-write would leave it.
    torn_at = path.read_bytes().index(b'{"n": 2}') + 5000
    with path.open("r+b") as f:
        f.seek(torn_at)
        byte = f.read(1)
        f.seek(torn_at)
        f.write(bytes([byte[0] ^ 0xFF]))
    journal.close()
    reopened = IntakeJournal(path, 1 << 20)
    recovered = reopened.recover()
    assert [(seq, meta["n"]) for seq, meta, _ in recovered] == [(2, 1), (4, 3)]
    assert recovered[0][2] == b"head" + _payload(1)
    reopened.reset_after_recovery()
    assert reopened.append(b"{}", [b"x"]) == 5  # numbering continues past everything seen
    reopened.close()


def test_journal_is_a_ring_that_never_overwrites_unapplied_records(tmp_path: Path) -> None:
    journal = _filled(tmp_path / "j.wal", 6 * PAGE)  # room for two 2-page records
    data = [b"y" * (PAGE + 100)]
    a, b = journal.append(b"{}", data), journal.append(b"{}", data)
    assert (a, b) == (1, 2)
    assert journal.append(b"{}", data) is None  # full, nothing applied yet
    journal.applied_through([2])
    assert journal.applied == 0  # 1 still outstanding holds the mark back
    assert journal.append(b"{}", data) is None  # record 1 sits where the next one would go
    journal.applied_through([1])
    assert journal.applied == 2
    assert journal.append(b'{"n": 3}', data) == 3  # wrapped to the top, over record 1
    assert journal.append(b'{"n": 4}', data) == 4  # over record 2
    assert journal.append(b"{}", data) is None  # and 3 is in the way again
    journal.applied_through([3])
    assert journal.append(b'{"n": 5}', data) == 5  # 3's place is free while 4 is outstanding
    journal.close()
    again = IntakeJournal(tmp_path / "j.wal", 6 * PAGE)
    assert [(seq, meta["n"]) for seq, meta, _ in again.recover()] == [(4, 4), (5, 5)]
    again.close()


def test_intake_writes_reports_in_order_and_applies(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, _filled(tmp_path / "j.wal", 4 << 20))
    assert intake.start() == 0
    for n in range(20):
        _store(intake, _instance(spool, n), [b"meta", _payload(n)])
    intake.association_ended(AssociationSummary("a1", "CT1", True, frozenset({SERIES}), time.time()))
    journal = intake.journal
    assert journal is not None
    intake.stop()
    assert sink.events == [("instance", f"{SERIES}.{n}") for n in range(20)] + [("ended", "a1")]
    for n in range(20):
        assert spool.path_for(STUDY, SERIES, f"{SERIES}.{n}").read_bytes() == b"meta" + _payload(n)
    assert journal.applied == 20


def test_full_journal_falls_back_to_direct_durable_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, _filled(tmp_path / "j.wal", 3 * PAGE))  # too small for any record
    intake.start()
    for n in range(3):
        assert intake.store(_instance(spool, n), [_payload(n)]) is None  # nothing left to finish
    intake.stop()
    assert [e[1] for e in sink.events] == [f"{SERIES}.{n}" for n in range(3)]
    assert all(spool.path_for(STUDY, SERIES, f"{SERIES}.{n}").read_bytes() == _payload(n) for n in range(3))


def test_a_direct_store_bypasses_the_journal(tmp_path: Path) -> None:
    """``direct=True`` (many senders at once): fsync'd straight into the spool, reported at
    once, nothing in the journal."""
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, _filled(tmp_path / "j.wal", 4 << 20))
    intake.start()
    assert intake.store(_instance(spool, 5), [_payload(5)], direct=True) is None
    assert sink.events == [("instance", f"{SERIES}.5")]
    assert spool.path_for(STUDY, SERIES, f"{SERIES}.5").read_bytes() == _payload(5)
    journal = intake.journal
    assert journal is not None and journal.last_seq == 0
    intake.stop()


def test_without_a_journal_the_intake_writes_directly(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, None)
    intake.start()
    assert intake.store(_instance(spool, 1), [_payload(1)]) is None
    assert sink.events == [("instance", f"{SERIES}.1")]  # reported at once, on the caller's thread
    intake.stop()


def test_acknowledged_instances_survive_a_crash_before_the_spool_write(tmp_path: Path) -> None:
    """A process that dies right after ``store`` returned (so right after the C-STORE success)
    loses nothing: the next start writes the files from the journal and reports them."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_journal import RecordingSink, _filled, _instance, _payload
        from dicom_node.journal import Intake
        from dicom_node.spool import Spool
        spool = Spool(Path({str(tmp_path / "spool")!r}))
        intake = Intake(spool, RecordingSink(), _filled(Path({str(tmp_path / "j.wal")!r}), 8 << 20))
        intake.start()
        for n in range(30):
            assert intake.store(_instance(spool, n), [_payload(n)]) is not None  # never finished
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=Path(__file__).parents[2])
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, IntakeJournal(tmp_path / "j.wal", 8 << 20))
    recovered = intake.start()
    intake.stop()
    assert recovered == 30
    for n in range(30):
        assert spool.path_for(STUDY, SERIES, f"{SERIES}.{n}").read_bytes() == _payload(n), n
    assert sink.events == [("instance", f"{SERIES}.{n}") for n in range(30)]
    assert not list((tmp_path / "spool").rglob("*.dn-partial"))


def test_recovery_finds_a_record_behind_an_old_one_left_by_a_torn_write(tmp_path: Path) -> None:
    """After a wrap, a new record whose write never reached the disk leaves an old record's
    header in its place; the scan must step page by page, not jump over the old record's
    length, or it would miss the valid (acknowledged) record right behind."""
    path = tmp_path / "j.wal"
    journal = _filled(path, 64 * PAGE)
    old = journal.append(b'{"n": "old"}', [b"o" * (20 * PAGE)])
    rest = journal.append(b"{}", [b"r" * (40 * PAGE)])
    assert (old, rest) == (1, 2)
    journal.applied_through([1, 2])
    with path.open("rb") as f:
        f.seek(PAGE)
        old_head = f.read(2 * PAGE)
    new = [journal.append(f'{{"n": {n}}}'.encode(), [b"s" * PAGE]) for n in range(2)]
    assert new == [3, 4]  # wrapped: record 3 at the top, over the old record's first pages
    journal.close()
    with path.open("r+b") as f:  # record 3 "never written": the old bytes are still there
        f.seek(PAGE)
        f.write(old_head)
    reopened = IntakeJournal(path, 64 * PAGE)
    assert [(seq, meta["n"]) for seq, meta, _ in reopened.recover()] == [(4, 1)]
    reopened.close()


def test_the_spool_file_is_written_once_the_answer_is_out(tmp_path: Path) -> None:
    """``store`` returns as soon as the record is durable (the C-STORE is answered then), with
    the spool file not written and nothing reported; ``finish`` writes and reports it."""
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, _filled(tmp_path / "j.wal", 4 << 20))
    intake.start()
    instance = _instance(spool, 7)
    pending = intake.store(instance, [_payload(7)])
    assert pending is not None and not instance.path.exists() and sink.events == []
    assert not intake.flush(0.2)  # the sink has not heard of an answered instance yet
    intake.finish(pending)
    assert intake.flush(5)
    assert instance.path.read_bytes() == _payload(7)
    assert sink.events == [("instance", f"{SERIES}.7")]
    intake.stop()


def test_finish_retries_while_the_disk_refuses_the_spool_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool write that fails after the answer is retried (the instance is safe in the
    journal) and reported once written; the other associations are not held up meanwhile."""
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, _filled(tmp_path / "j.wal", 4 << 20))
    intake.start()
    other_done, refused = threading.Event(), threading.Event()
    real_store_at = Spool.store_at

    def full_disk_for_1(self: Spool, final: Path, *args: object, **kwargs: object) -> Path:
        if final.stem == f"{SERIES}.1" and not other_done.is_set():  # until 2 was stored
            refused.set()
            raise SpoolWriteError("No space left on device")
        return real_store_at(self, final, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Spool, "store_at", full_disk_for_1)
    stuck = intake.store(_instance(spool, 1), [_payload(1)])
    assert stuck is not None
    retrying = threading.Thread(target=intake.finish, args=(stuck,))
    retrying.start()
    assert refused.wait(30)
    _store(intake, _instance(spool, 2), [_payload(2)])  # another association, meanwhile
    other_done.set()
    retrying.join(30)
    assert not retrying.is_alive()
    assert sink.events == [("instance", f"{SERIES}.2"), ("instance", f"{SERIES}.1")]
    assert spool.path_for(STUDY, SERIES, f"{SERIES}.1").read_bytes() == _payload(1)
    intake.stop()
    assert intake.journal is not None and intake.journal.applied == 2


class SlowFlushes:
    """``os.fdatasync`` as it is, plus a delay (a disk whose flush takes 5 ms), counted; the
    first ``fail`` calls after ``arm()`` raise EIO instead, as a failing disk does."""

    def __init__(self, real: object, delay: float = 0.005) -> None:
        self.real, self.delay = real, delay
        self.calls = 0
        self.fail = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise OSError(5, "Input/output error")
        self.real(fd)  # type: ignore[operator]


def test_parallel_appends_share_flushes_and_all_survive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: 8 associations appending at once need far fewer flushes than records, and
    every record each of them was told is durable is recovered after a reopen."""
    path = tmp_path / "j.wal"
    journal = _filled(path, 8 << 20)
    flushes = SlowFlushes(journal_module.os.fdatasync)
    monkeypatch.setattr(journal_module.os, "fdatasync", flushes)
    done: dict[int, int] = {}
    lock = threading.Lock()

    def sender(t: int) -> None:
        for i in range(20):
            n = t * 100 + i
            seq = journal.append(f'{{"n": {n}}}'.encode(), [_payload(n, 20_000)])
            assert seq is not None
            with lock:
                done[n] = seq

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == 160
    assert flushes.calls <= 80, f"{flushes.calls} flushes for 160 records: no group commit"
    monkeypatch.undo()
    journal.close()
    reopened = IntakeJournal(path, 8 << 20)
    recovered = {meta["n"]: (seq, data) for seq, meta, data in reopened.recover()}
    assert {n: seq for n, (seq, _) in recovered.items()} == done
    assert all(data == _payload(n, 20_000) for n, (_, data) in recovered.items())
    reopened.close()


def test_a_failed_flush_fails_every_record_it_covered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose flush failed is an error for its sender (nothing promised), never retried
    into a false success; the next records are made durable by a new flush."""
    path = tmp_path / "j.wal"
    journal = _filled(path, 1 << 20)
    flushes = SlowFlushes(journal_module.os.fdatasync, delay=0.0)
    monkeypatch.setattr(journal_module.os, "fdatasync", flushes)
    flushes.fail = 1
    with pytest.raises(OSError, match="Input/output error"):
        journal.append(b"{}", [b"lost"])
    assert journal.append(b"{}", [b"kept"]) == 2
    monkeypatch.undo()
    journal.close()
    # The failed record was voided (it must not hold back the applied mark): only one is left.
    reopened = IntakeJournal(path, 1 << 20)
    assert [(seq, data) for seq, _, data in reopened.recover()] == [(2, b"kept")]
    reopened.close()


def test_a_failed_spool_sync_keeps_the_records_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the disk fails the batch sync, the sync thread lives on, nothing is marked applied,
    and the next start writes those instances from the journal again."""
    spool = Spool(tmp_path / "spool")
    sink = RecordingSink()
    intake = Intake(spool, sink, _filled(tmp_path / "j.wal", 4 << 20))
    intake.start()
    failures: list[int] = []

    def failing_sync(self: FilesystemSync) -> None:
        failures.append(1)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(FilesystemSync, "sync", failing_sync)
    for n in range(3):
        _store(intake, _instance(spool, n), [_payload(n)])
    deadline = time.monotonic() + 30
    while not failures:  # the sync thread syncs once the stream pauses (0.5 s)
        assert time.monotonic() < deadline, "the spool files were never synced"
        time.sleep(0.05)
    journal = intake.journal
    assert journal is not None and journal.applied == 0
    monkeypatch.undo()
    _store(intake, _instance(spool, 3), [_payload(3)])  # the sync thread still works
    intake.stop()
    assert [e[1] for e in sink.events] == [f"{SERIES}.{n}" for n in range(4)]

    sink = RecordingSink()
    again = Intake(spool, sink, IntakeJournal(tmp_path / "j.wal", 4 << 20))
    assert again.start() == 4  # 0-2 were never applied, and 3 is behind them in the ring
    again.stop()
    assert all(spool.path_for(STUDY, SERIES, f"{SERIES}.{n}").read_bytes() == _payload(n) for n in range(4))


def test_filesystem_sync_covers_the_spool_filesystem(tmp_path: Path) -> None:
    """syncfs is there on Linux, covers files of the spool's filesystem and succeeds."""
    fs = FilesystemSync(tmp_path)
    try:
        assert fs.available == sys.platform.startswith("linux")
        (tmp_path / "f").write_bytes(b"x")
        assert fs.covers(tmp_path / "f") and fs.covers(tmp_path / "gone")
        assert not fs.covers(Path("/proc")) or not sys.platform.startswith("linux")
        if fs.available:
            fs.sync()
    finally:
        fs.close()


def test_record_checksum_is_zlib_crc32() -> None:
    """The fast CRC gives zlib's values, so journals written either way recover alike."""
    import struct
    import zlib

    meta, chunks = b'{"n": 1}', [b"head", _payload(1), memoryview(bytearray(_payload(2)))[7:]]
    expected = zlib.crc32(struct.pack("<QII", 9, len(meta), sum(len(c) for c in chunks)))
    for part in (meta, *chunks):
        expected = zlib.crc32(part, expected)
    assert journal_module._crc(9, meta, chunks) == expected
