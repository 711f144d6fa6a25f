"""The embedded broker's wake-up: publishers poke every consumer socket of their broker file."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

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
