"""A fork of a worker process never copies a heartbeat in progress (``workers.heartbeat``).

The prefork pool forks replacement processes from the worker's main process, whose heartbeat
thread uses SQLite and kombu; a fork in the middle of a beat gave the child library locks held
by a thread it does not have, and the child hung in ``sqlite3.connect``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from celery import Celery

from dicom_node.catalog import Catalog
from dicom_node.catalog import heartbeats as heartbeat
from workers.heartbeat import _Heartbeats


def test_a_fork_waits_for_the_heartbeat_in_progress_and_the_child_uses_the_catalog(tmp_path: Path) -> None:
    """A fork started while the heartbeat thread is inside a beat happens after the beat; the
    child then opens the catalog and writes to it."""
    inside, release = threading.Event(), threading.Event()
    progress: list[str] = []

    def warm_models() -> list[dict[str, object]]:  # called inside the beat, after the probe
        inside.set()
        release.wait(30)
        progress.append("beat ended")
        return []

    url = f"sqlite:///{tmp_path / 'node.db'}"
    app = Celery("t", broker=f"sqla+sqlite:///{tmp_path / 'broker.db'}", set_as_current=False)
    hb = _Heartbeats(app, url, 60.0, warm_models)
    hb.hostname = "w1@test"
    beat = threading.Thread(target=hb._beat_once)
    beat.start()
    assert inside.wait(30), "the beat never reached its catalog write"
    # Ends the beat while the fork below is held up by it (without the wait the fork happened
    # at once, in the middle of the beat, and the child saw no "beat ended").
    threading.Timer(0.3, release.set).start()
    pid = os.fork()
    if pid == 0:  # the child: what a replacement pool process does first
        code = 1
        try:
            if progress == ["beat ended"]:
                heartbeat.beat(Catalog(url), "w1@test", os.getpid(), queues=("inference",), device=None)
                code = 0
        except BaseException as exc:  # the child's only report: stderr, then its exit code
            os.write(2, f"child: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    beat.join(30)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's beat and the child's, one row each.
    assert sorted(w.pid for w in heartbeat.worker_statuses(Catalog(url))) == sorted([os.getpid(), pid])
