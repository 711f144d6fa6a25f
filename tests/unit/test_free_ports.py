"""tests/support/procs.free_port under pytest-xdist: a block per worker, outside the ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support import procs


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_ports_are_distinct_per_worker_bindable_and_not_ephemeral(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers never get the same port, nor the same one twice; an outgoing connection can
    never be given one of them (they lie below the kernel's ephemeral range)."""
    got: dict[str, list[int]] = {}
    for worker in ("gw0", "gw1", "gw7"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        got[worker] = [procs.free_port() for _ in range(50)]
    every = [p for ports in got.values() for p in ports]
    assert len(set(every)) == len(every)
    blocks = {w: {(p - procs.PORT_RANGE[0]) // ((procs.PORT_RANGE[1] - procs.PORT_RANGE[0]) // procs.PORT_BLOCKS)
                  for p in ports} for w, ports in got.items()}
    assert blocks == {"gw0": {0}, "gw1": {1}, "gw7": {7}}
    low, _high = _ephemeral_range()
    assert max(every) < low
    with socket.socket() as s:
        s.bind((procs.LOOPBACK, got["gw1"][-1]))  # free when handed out


def test_a_bound_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port something listens on is passed over, not handed out."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with socket.socket() as taken:
        taken.bind((procs.LOOPBACK, procs.free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        start, size = procs._port_block()
        key = next(k for k in procs._next_port if k.endswith(f"-{start}"))
        procs._next_port[key] = busy - start  # the next call starts at the taken port
        port = procs.free_port()
        assert port != busy and start <= port < start + size
