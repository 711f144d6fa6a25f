"""The newest association requests the listener rejected, kept in memory for the dashboard.

Bounded (:data:`KEPT`), newest first, lost at restart: the log line ``association_rejected`` and
the metric ``dicom_node_associations_total{outcome="rejected"}`` are the lasting record.  In
memory rather than in the catalog because the reader (the web server) runs in the same
``serve`` process as the listener, and a storm of rejected requests must not become a storm
of database writes.  No patient data: AE titles, the peer's address and the reason only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

#: How many rejections are kept (the oldest is dropped first).
KEPT = 50


@dataclass(frozen=True)
class Rejection:
    """One rejected association request."""

    at: float
    calling_ae_title: str
    called_ae_title: str
    peer: str
    reason: str


class RejectionLog:
    """A thread-safe ring of the newest :class:`Rejection` s (association threads write it)."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self._items: deque[Rejection] = deque(maxlen=kept)
        self._lock = threading.Lock()
        self.total = 0

    def add(self, calling_ae_title: str, called_ae_title: str, peer: str, reason: str,
            at: float | None = None) -> None:
        """Remember one rejection (``at`` defaults to now)."""
        item = Rejection(time.time() if at is None else at, calling_ae_title, called_ae_title, peer, reason)
        with self._lock:
            self._items.append(item)
            self.total += 1

    def recent(self) -> list[Rejection]:
        """The kept rejections, newest first."""
        with self._lock:
            return list(reversed(self._items))


@dataclass(frozen=True)
class RejectionGroup:
    """Rejections of one peer for one reason: how many of the kept ones, and the newest."""

    calling_ae_title: str
    called_ae_title: str
    #: The peer's address without its (ephemeral) port.
    peer_host: str
    reason: str
    count: int
    last_at: float


def peer_host(peer: str) -> str:
    """``"10.0.0.7:51234"`` -> ``"10.0.0.7"`` (an IPv6 address keeps its colons)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def group(rejections: Iterable[Rejection]) -> list[RejectionGroup]:
    """``rejections`` by (calling AE, called AE, peer host, reason), newest group first: a sender
    retrying with a wrong AE title is one line with a count, not fifty (``dicom-node status``)."""
    groups: dict[tuple[str, str, str, str], list[Rejection]] = {}
    for r in rejections:
        groups.setdefault((r.calling_ae_title, r.called_ae_title, peer_host(r.peer), r.reason), []).append(r)
    out = [RejectionGroup(*key, count=len(items), last_at=max(i.at for i in items)) for key, items in groups.items()]
    return sorted(out, key=lambda g: -g.last_at)
