"""The shared skeleton of serve's periodic threads (dicom_node.periodic.PeriodicLoop), on real threads."""

from __future__ import annotations

import threading

from structlog.testing import capture_logs

from dicom_node.periodic import PeriodicLoop


class Counting(PeriodicLoop):
    """Counts its passes; the first ``failing`` of them raise."""

    name = "test-periodic"
    failure_event = "test_pass_failed"

    def __init__(self, *, every: float, failing: int = 0, on: bool = True, at_once: bool = False) -> None:
        super().__init__()
        self.every = every
        self.failing = failing
        self.on = on
        self.first_at_once = at_once
        self.passes = 0
        self.reached = threading.Event()
        self.wanted = 1

    @property
    def enabled(self) -> bool:
        return self.on

    def interval(self) -> float:
        return self.every

    def run_once(self) -> None:
        self.passes += 1
        if self.passes >= self.wanted:
            self.reached.set()
        if self.passes <= self.failing:
            raise RuntimeError("pass failed")


def test_a_disabled_loop_starts_no_thread() -> None:
    loop = Counting(every=0.001, on=False)
    loop.start()
    assert loop._thread is None
    loop.stop()  # stopping a loop never started is fine
    assert loop.passes == 0


def test_a_failed_pass_is_logged_and_the_next_pass_runs() -> None:
    loop = Counting(every=0.001, failing=1)
    loop.wanted = 2
    with capture_logs() as logs:
        loop.start()
        assert loop.reached.wait(30)
        loop.stop()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert loop._thread.name == "test-periodic"
    assert loop.passes >= 2
    failed = [e for e in logs if e["event"] == "test_pass_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error" and failed[0]["exc_info"]


def test_first_at_once_runs_before_the_first_interval_and_stop_wakes_the_wait() -> None:
    loop = Counting(every=3600.0, at_once=True)
    loop.start()
    loop.start()  # a second start starts no second thread
    assert loop.reached.wait(30)  # an hour's interval: only the first pass at start can be it
    loop.stop()  # wakes the hour-long wait: the thread ends
    assert loop._thread is not None and not loop._thread.is_alive()
    assert loop.passes == 1


def test_without_first_at_once_no_pass_runs_before_the_interval() -> None:
    loop = Counting(every=3600.0)
    loop.start()
    loop.stop()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert loop.passes == 0
