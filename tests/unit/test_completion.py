"""Completion that learns the sender, the open-association guard and incomplete series.

In-process: a real catalog (SQLite), the real recorder and completion loop, a memory queue, and
explicit clocks (``tick(now=...)``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.catalog import Catalog, JobRow
from dicom_node.catalog.recorder import CatalogRecorder
from dicom_node.catalog.senders import sender_stats
from dicom_node.catalog.tables import SenderHistoryRow
from dicom_node.ingest.events import AssociationSummary, StoredInstance
from dicom_node.scheduling.completion import CompletionLoop
from dicom_node.settings import load_settings
from tests.support.queues import MemoryQueue

STUDY = "1.2.3"


def inst(series: str, n: int, t: float, assoc: str, ae: str = "PACS", **attrs: object) -> StoredInstance:
    base: dict[str, str | int | float] = {"Modality": "CT"}
    base.update(attrs)  # type: ignore[arg-type]
    return StoredInstance(STUDY, series, f"{series}.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                          Path(f"/spool/{series}/{n}.dcm"), 100, ae, assoc, t, base)


class Harness:
    """A recorder + completion loop on one catalog, fed like the listener feeds them."""

    def __init__(self, tmp_path: Path, extra: str = "", rule: str = "") -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        cfg = tmp_path / "n.toml"
        cfg.write_text(f"""
[completion]
idle_seconds = 15
learn_min_series = 3
history_size = 4
max_open_seconds = 100
incomplete_grace_seconds = 30
{extra}
[[rules]]
name = "ct"
match = {{ Modality = "CT" }}
models = ["ct-tissue"]
{rule}
""")
        self.settings = load_settings(cfg)
        self.catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
        self.queue = MemoryQueue()
        self.loop = CompletionLoop(self.settings, self.catalog, self.queue)
        self.premature: list[str] = []
        self.recorder = CatalogRecorder(self.catalog, linger_s=0.0, on_premature=self.premature.append)
        self.recorder.start()
        self._assoc = 0

    def send(self, series: str, t: float, n: int = 3, first: int = 0, release: bool | None = True,
             ae: str = "PACS", **attrs: object) -> str:
        """One association carrying ``n`` instances of ``series`` at ``t``, released (True) or
        aborted (False) at t + 0.1, or left open (None)."""
        self._assoc += 1
        assoc = f"a{self._assoc}"
        for i in range(first, first + n):
            self.recorder.instance_stored(inst(series, i, t, assoc, ae, **attrs))
        if release is not None:
            self.recorder.association_ended(AssociationSummary(assoc, ae, release, frozenset({series}), t + 0.1))
        assert self.recorder.flush()
        return assoc

    def reason(self, series: str) -> str | None:
        row = self.catalog.get_series(series)
        assert row is not None
        return row.completion_reason if row.state == "complete" else None

    def close(self) -> None:
        self.recorder.stop()
        self.catalog.close()


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    yield harness  # type: ignore[misc]
    harness.close()


def learn(h: Harness, count: int = 3, ae: str = "PACS") -> None:
    """``count`` whole series in one association each, completed by the idle timer."""
    for k in range(count):
        h.send(f"9.{ae}.{k}", 100.0 + k, ae=ae)
    h.loop.tick(now=200.0)


def test_sender_is_learned_after_the_minimum_and_then_completes_at_release(h: Harness) -> None:
    """Below the minimum history a series waits for the idle timer; once the sender's last 3
    series all ended with their association, the next one completes 0.5 s after release."""
    learn(h, 2)
    h.send("1.1", 300.0)
    assert h.loop.tick(now=300.5) == [] and h.reason("1.1") is None  # 2 < 3 series known
    assert h.loop.tick(now=315.1) and h.reason("1.1") == "idle"
    stats = sender_stats(h.catalog, 3)[("PACS", "ct")]
    assert (stats.series, stats.splits, stats.mode) == (3, 0, "association")
    h.send("1.2", 400.0)
    assert h.loop.tick(now=400.3) == []  # released at 400.1: grace 0.5 s not over
    assert len(h.loop.tick(now=400.7)) == 1 and h.reason("1.2") == "learned"


def test_sender_that_splits_series_is_never_completed_at_release(h: Harness) -> None:
    """Two associations per series with a pause: the series is split, the sender stays on the
    idle timer however many series it sends."""
    for k in range(5):
        uid = f"2.{k}"
        t = 1000.0 * (k + 1)
        h.send(uid, t, n=2)
        assert h.loop.tick(now=t + 5.0) == []  # pause between the two associations
        h.send(uid, t + 6.0, n=2, first=2)
        assert h.loop.tick(now=t + 7.0) == [] and h.reason(uid) is None
        assert h.loop.tick(now=t + 21.2) and h.reason(uid) == "idle"
    stats = sender_stats(h.catalog, 3)[("PACS", "ct")]
    assert (stats.series, stats.splits, stats.mode) == (4, 4, "idle")  # bounded to history_size
    assert stats.split_rate == 1.0


def test_instance_after_early_completion_is_premature_and_sends_the_sender_back(h: Harness) -> None:
    """The safety net: a learned sender's series completed at release gets one more instance:
    counted (callback/metric, history), the series is reprocessed as generation 2 and the
    sender's next series waits for the idle timer."""
    learn(h)
    h.send("3.1", 500.0)
    assert len(h.loop.tick(now=500.7)) == 1 and h.reason("3.1") == "learned"
    h.send("3.1", 502.0, n=1, first=3)
    assert h.premature == ["PACS"]
    row = h.catalog.get_series("3.1")
    assert row is not None and row.state == "receiving" and row.generation == 2
    stats = sender_stats(h.catalog, 3)[("PACS", "ct")]
    assert (stats.mode, stats.premature, stats.splits) == ("idle", 1, 1)
    assert h.loop.tick(now=502.7) == []  # generation 2 waits for the timer now
    assert h.loop.tick(now=517.2) and h.reason("3.1") == "idle"
    with h.catalog.session() as s:
        assert sorted(s.scalars(select(JobRow.generation).where(JobRow.series_instance_uid == "3.1"))) == [1, 2]
    h.send("3.2", 600.0)
    assert h.loop.tick(now=601.0) == [] and h.reason("3.2") is None


def test_history_is_per_calling_ae_title(h: Harness) -> None:
    """Another sender is not learned from PACS's history."""
    learn(h)
    h.send("4.1", 700.0, ae="MODALITY")
    assert h.loop.tick(now=701.0) == [] and h.reason("4.1") is None


def test_rule_forces_the_mode(tmp_path: Path) -> None:
    """``completion = "idle"`` ignores a learned sender; ``"association"`` needs no history."""
    idle = Harness(tmp_path / "i", rule='completion = "idle"')
    try:
        learn(idle)
        idle.send("5.1", 300.0)
        assert idle.loop.tick(now=301.0) == [] and idle.reason("5.1") is None
    finally:
        idle.close()
    forced = Harness(tmp_path / "a", rule='completion = "association"')
    try:
        forced.send("5.2", 300.0)
        assert forced.loop.tick(now=300.7) and forced.reason("5.2") == "rule association"
    finally:
        forced.close()


def test_open_association_holds_the_idle_timer_up_to_max_open_seconds(h: Harness) -> None:
    """A stalled sender: its association stays open, no instance for longer than idle_seconds;
    the series waits until max_open_seconds, or until the association ends."""
    h.send("6.1", 100.0, release=None)
    row = h.catalog.get_series("6.1")
    assert row is not None and row.open_associations == 1
    assert h.loop.tick(now=130.0) == [] and h.reason("6.1") is None
    assert h.loop.tick(now=200.1) and h.reason("6.1") == "idle"
    # The same, ended by an abort: the timer applies again (an abort is no completion hint).
    assoc = h.send("6.2", 300.0, release=None)
    assert h.loop.tick(now=320.0) == []
    h.recorder.association_ended(AssociationSummary(assoc, "PACS", False, frozenset({"6.2"}), 320.0))
    assert h.recorder.flush()
    row = h.catalog.get_series("6.2")
    assert row is not None and row.open_associations == 0 and row.released_at is None
    assert h.loop.tick(now=320.1) and h.reason("6.2") == "idle"


def test_incomplete_series_waits_then_is_processed_with_a_note(h: Harness) -> None:
    """24 of 48 announced: not at idle; after the grace processed, with the note on the series,
    the job's first event and the queue reason."""
    h.send("7.1", 100.0, n=24, release=False, ImagesInAcquisition=48)
    assert h.loop.tick(now=116.0) == [] and h.reason("7.1") is None
    [job_id] = h.loop.tick(now=145.1)
    row = h.catalog.get_series("7.1")
    assert row is not None and row.note == "incomplete: received 24 of 48"
    events = h.catalog.job_events(job_id)
    assert events[0].detail == "rule ct; incomplete: received 24 of 48"
    assert events[1].detail == "series complete (idle); incomplete: received 24 of 48"


def test_incomplete_series_refused_by_rule(tmp_path: Path) -> None:
    """``on_incomplete = "refuse"``: complete with a note saying so, and no job."""
    h = Harness(tmp_path, rule='on_incomplete = "refuse"')
    try:
        h.send("8.1", 100.0, n=24, release=False, ImagesInAcquisition=48)
        assert h.loop.tick(now=145.1) == []
        row = h.catalog.get_series("8.1")
        assert row is not None and row.state == "complete"
        assert row.note == "incomplete: received 24 of 48; refused by rule ct (on_incomplete = refuse)"
        assert h.catalog.list_jobs() == []
    finally:
        h.close()


def test_history_is_bounded(h: Harness) -> None:
    """At most ``history_size`` series are kept per sender."""
    learn(h, 7)
    with h.catalog.session() as s:
        assert len(s.scalars(select(SenderHistoryRow)).all()) == 4


def test_next_tick_is_timed_for_the_end_of_an_association_grace(tmp_path: Path) -> None:
    """With a 1 s poll, a learned sender's series released at 400.1 s is ticked at 400.6 s
    (release + 0.5 s grace), not at the next poll; with no grace running the pause is the poll."""
    h = Harness(tmp_path, extra="poll_seconds = 1.0")
    try:
        learn(h, 3)
        assert h.loop.pause(now=400.0) == 1.0
        h.send("1.3", 400.0)
        assert h.loop.tick(now=400.2) == []
        assert h.loop.pause(now=400.2) == pytest.approx(0.4)  # 400.1 + 0.5 - 400.2
        assert h.loop.pause(now=400.7) == 0.005  # overdue: tick at once
        assert len(h.loop.tick(now=400.6)) == 1 and h.reason("1.3") == "learned"
        assert h.loop.pause(now=400.6) == 1.0
        h.send("1.4", 500.0, ImagesInAcquisition=5)  # a count it has not reached: no grace to wait for
        assert h.loop.tick(now=500.2) == [] and h.loop.pause(now=500.2) == 1.0
    finally:
        h.close()
