"""The embedded broker's wake-up: publishers poke every consumer socket of their broker file."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Producer, Queue  # type: ignore[attr-defined]

from dicom_node._compat import kombu as sqla_transport
from dicom_node._compat.kombu import WakeSocket, wake_consumers, wake_dir


def test_wake_dir_is_short_whatever_the_broker_path(tmp_path: Path) -> None:
    """A Unix socket path is limited to 107 bytes: a deep data folder must not break the worker."""
    deep = tmp_path.joinpath(*(["a-rather-long-folder-name"] * 8)) / "broker.db"
    folder = wake_dir(f"sqlite:///{deep}")
    assert folder is not None and len(str(folder / f"{os.getpid()}-12345678.sock")) < 100
    assert wake_dir(f"sqlite:///{deep}") == folder  # publisher and consumer agree
    assert wake_dir(f"sqlite:///{tmp_path / 'other.db'}") != folder
    assert wake_dir("postgresql://host/db") is None
    assert wake_dir("sqlite:///:memory:") is None


def test_publish_wakes_a_sleeping_consumer_and_stale_sockets_go(tmp_path: Path) -> None:
    folder = wake_dir(f"sqlite:///{tmp_path / 'broker.db'}")
    assert folder is not None
    consumer = WakeSocket(folder)
    stale = WakeSocket(folder)
    stale.sock.close()  # a consumer that died without cleaning up
    try:
        started = time.monotonic()
        consumer.wait(0.01)
        assert wake_consumers(folder) == 1
        assert not stale.path.exists()
        consumer.wait(5.0)
        assert time.monotonic() - started < 2.0  # woken, not timed out
        assert select.select([consumer.sock], [], [], 0)[0] == []  # every wake-up swallowed
        consumer.poke()
        assert select.select([consumer.sock], [], [], 1.0)[0] == [consumer.sock]
    finally:
        consumer.close()
        stale.close()
    assert not consumer.path.exists()


def test_stop_consuming_wakes_the_sleeper_and_fetches_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker told to stop (Celery's ``worker_shutting_down``) ends the wait it is in at once
    and ``drain_events`` returns without taking the message waiting in the queue, which a
    consumer that has not stopped then gets."""
    monkeypatch.setattr(sqla_transport, "_stopping_pid", None)  # the flag is per process
    sqla_transport.register()
    folder = wake_dir(f"sqlite:///{tmp_path / 'sleep.db'}")
    assert folder is not None
    sleeper = WakeSocket(folder)
    try:
        waiting = threading.Thread(target=sleeper.wait, args=(120.0,))
        waiting.start()
        sqla_transport.stop_consuming()
        waiting.join(60.0)
        assert not waiting.is_alive(), "stop_consuming did not wake the sleeping consumer"
    finally:
        sleeper.close()

    got: list[object] = []
    queue = Queue("t")
    with Connection(f"sqla+sqlite:///{tmp_path / 'broker.db'}") as conn, conn.channel() as channel:
        Producer(channel).publish({"job": 1}, routing_key="t", declare=[queue])
        with Consumer(conn, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=120)
            assert got == []
            monkeypatch.setattr(sqla_transport, "_stopping_pid", os.getpid() + 1)  # another process's flag
            conn.drain_events(timeout=120)
    assert got == [{"job": 1}]
