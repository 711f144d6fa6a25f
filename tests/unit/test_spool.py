"""The spool: layout, UID validation, atomic replacement, temp-file hygiene."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import dicom_node.ingest.spool as spool_module
from dicom_node.errors import InvalidUIDError, TransientError
from dicom_node.ingest.spool import TEMP_SUFFIX, Spool, SpoolWriteError

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1.2.3"


def test_path_for_lays_out_study_series_sop(tmp_path: Path) -> None:
    """An instance lives at ``root/<Study>/<Series>/<SOP>.dcm``."""
    spool = Spool(tmp_path / "spool")
    assert spool.path_for(STUDY, SERIES, SOP) == tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"


@pytest.mark.parametrize(
    ("study", "series", "sop", "name"),
    [
        ("../../etc", SERIES, SOP, "StudyInstanceUID"),
        (STUDY, "1.2/../3", SOP, "SeriesInstanceUID"),
        (STUDY, SERIES, "1." + "2" * 64, "SOPInstanceUID"),
        (STUDY, SERIES, "", "SOPInstanceUID"),
        (STUDY, SERIES, "1.02.3", "SOPInstanceUID"),
    ],
)
def test_path_for_refuses_invalid_uids(
    tmp_path: Path, study: str, series: str, sop: str, name: str
) -> None:
    """A UID with ``../``, over 64 characters or bad syntax never becomes a path part."""
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUIDError, match=name):
        spool.path_for(study, series, sop)
    with pytest.raises(InvalidUIDError, match=name):
        spool.store(study, series, sop, b"data")
    assert list(tmp_path.rglob("*")) == []


def test_store_writes_bytes_and_chunks(tmp_path: Path) -> None:
    """``store`` accepts bytes or an iterable of chunks and writes them in order."""
    spool = Spool(tmp_path)
    path = spool.store(STUDY, SERIES, SOP, [b"abc", memoryview(b"def"), bytearray(b"g")])
    assert path.read_bytes() == b"abcdefg"
    path2 = spool.store(STUDY, SERIES, SOP + ".1", b"xyz")
    assert path2.read_bytes() == b"xyz"


def test_resent_instance_replaces_its_copy(tmp_path: Path) -> None:
    """Storing the same SOP instance again replaces the file atomically (no temp left)."""
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, SOP, b"first version")
    inode = first.stat().st_ino
    second = spool.store(STUDY, SERIES, SOP, b"second")
    assert first == second
    assert second.read_bytes() == b"second"
    assert second.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert list(spool.iter_instances()) == [second]
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))


def test_crash_leftover_temp_file_is_not_an_instance_and_is_cleaned(tmp_path: Path) -> None:
    """A temp file left by a crash is never listed and ``clean_temp_files`` removes it."""
    spool = Spool(tmp_path)
    good = spool.store(STUDY, SERIES, SOP, b"complete")
    # What a crash between open() and rename() leaves behind.
    leftover = good.parent / f".{SOP}.9.deadbeef{TEMP_SUFFIX}"
    leftover.write_bytes(b"half writ")
    (good.parent / "notes.txt").write_text("stray")
    assert list(spool.iter_instances()) == [good]
    assert spool.clean_temp_files() == 1
    assert not leftover.exists()
    assert good.read_bytes() == b"complete"
    assert list(spool.iter_instances()) == [good]


def test_failed_write_removes_temp_file_and_is_transient(tmp_path: Path) -> None:
    """A failing chunk source leaves no temp file and no instance, and raises a TransientError."""
    spool = Spool(tmp_path)

    def chunks() -> object:
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(SpoolWriteError, match="No space left on device") as info:
        spool.store(STUDY, SERIES, SOP, chunks())  # type: ignore[arg-type]
    assert isinstance(info.value, TransientError)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_store_recreates_folder_removed_behind_its_back(tmp_path: Path) -> None:
    """If retention removed a series folder the spool had seen, the next store recreates it."""
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, SOP, b"a")
    first.unlink()
    first.parent.rmdir()
    again = spool.store(STUDY, SERIES, SOP, b"b")
    assert again.read_bytes() == b"b"


def test_iter_instances_lists_every_series(tmp_path: Path) -> None:
    """Restart reconciliation sees every stored instance across studies and series."""
    spool = Spool(tmp_path)
    paths = {
        spool.store(STUDY, SERIES, SOP, b"1"),
        spool.store(STUDY, SERIES, SOP + ".2", b"2"),
        spool.store(STUDY + ".9", SERIES + ".9", SOP + ".9", b"3"),
    }
    assert set(spool.iter_instances()) == paths


def test_concurrent_stores_into_new_folders(tmp_path: Path) -> None:
    """Many threads creating the same new folders at once all succeed."""
    spool = Spool(tmp_path)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            spool.store(STUDY, SERIES, f"{SOP}.{i + 1}", os.urandom(1000))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(spool.iter_instances())) == 16


def test_free_mb_reports_filesystem_space(tmp_path: Path) -> None:
    """``free_mb`` matches the filesystem's available space."""
    spool = Spool(tmp_path)
    st = os.statvfs(tmp_path)
    expected = st.f_bavail * st.f_frsize / 2**20
    assert spool.free_mb() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "temporary-name"])
def test_durable_writes_are_whole_new_files_or_replacements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    """The durable write (an unnamed file fdatasync'd, then linked; elsewhere a temporary name
    renamed) leaves the whole file under its name, replaces a re-sent one, and no temporary."""
    if not tmpfile:
        monkeypatch.setattr(spool_module, "_O_TMPFILE", 0)
    elif not spool_module._O_TMPFILE:
        pytest.skip("O_TMPFILE is Linux only")  # the CI machine is Linux: it runs
    spool = Spool(tmp_path / "spool")
    path = spool.store(STUDY, SERIES, SOP, [b"meta", b"a" * 70_000])
    assert path.read_bytes() == b"meta" + b"a" * 70_000
    inode = path.stat().st_ino
    assert spool.store_at(path, [b"meta", b"b" * 10]) == path
    assert path.read_bytes() == b"metabbbbbbbbbb" and path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    spool.close()


def test_a_filesystem_without_unnamed_files_gets_temporary_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem refuses an unnamed file, the spool writes through a temporary
    name from then on."""
    refused: list[str] = []

    def unsupported(folder_fd: int, name: str, chunks: list[bytes], *_access: object) -> bool:
        refused.append(name)
        return False

    monkeypatch.setattr(spool_module, "_write_unnamed", unsupported)
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, SOP, b"one")
    second = spool.store(STUDY, SERIES, SOP + ".2", b"two")
    assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")
    assert refused == [first.name]  # asked once, then remembered


def test_a_series_folder_replaced_behind_its_back_gets_the_file(tmp_path: Path) -> None:
    """The spool keeps folders open; one removed and made again by someone else (retention,
    an operator) is not written into through the old handle: the file lands in the new one."""
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, SOP, b"a")
    folder = first.parent
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    folder.mkdir()
    again = spool.store(STUDY, SERIES, SOP + ".2", b"b")
    assert again.parent == folder and again.read_bytes() == b"b"
    assert [p.name for p in folder.iterdir()] == [again.name]


def test_folder_handles_are_bounded_and_never_closed_in_use(tmp_path: Path) -> None:
    """Beyond the limit the least recently used folder is closed, but never one a thread is
    writing into; one forgotten while in use is closed by its last user."""
    handles = spool_module._FolderHandles(limit=1)
    a, b, c = (tmp_path / n for n in "abc")
    for folder in (a, b, c):
        folder.mkdir()
    with handles.use(a) as fd_a:
        with handles.use(b):
            assert set(handles._open) == {a, b}  # a is in use: kept beyond the limit
        os.fstat(fd_a)
        handles.forget(a)
        os.fstat(fd_a)  # still open for its user
        assert a not in handles._open
    with pytest.raises(OSError):
        os.fstat(fd_a)  # closed by its last user
    with handles.use(c):
        pass
    assert set(handles._open) == {c}
    handles.close()
    assert handles._open == {}


@pytest.mark.skipif(not spool_module._O_TMPFILE, reason="O_TMPFILE is Linux only")  # CI is Linux: it runs
def test_a_folder_removed_between_write_and_link_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The series folder disappears after the unnamed file was written and flushed, before it
    is linked: the write is done again into a new folder, and unnamed files stay in use."""
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, b"first")  # the folder exists and its handle is kept
    folder = spool.path_for(STUDY, SERIES, SOP).parent
    real_datasync = spool_module._datasync
    removed: list[Path] = []

    def datasync_then_remove(fd: int) -> None:
        real_datasync(fd)
        if not removed:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            removed.append(folder)

    monkeypatch.setattr(spool_module, "_datasync", datasync_then_remove)
    path = spool.store(STUDY, SERIES, SOP + ".2", b"second")
    assert removed and path.read_bytes() == b"second"
    assert [p.name for p in folder.iterdir()] == [path.name]
    assert spool._unnamed
