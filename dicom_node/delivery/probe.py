"""Destination reachability, checked in the background for ``/readyz`` and ``/metrics``.

A C-ECHO (or an authenticated QIDO-RS for DICOMweb) per destination every ``interval`` seconds,
in one thread, so a request to ``/readyz`` never waits on a peer.  An archive that is down is
reported, never a reason for the node to be unready: it still receives and processes studies,
and delivery retries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

from dicom_node.delivery import reachable
from dicom_node.periodic import PeriodicLoop
from dicom_node.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    detail: str
    checked_at: float


class DestinationProber(PeriodicLoop):
    """Probes every configured destination every ``interval`` seconds (the first time at once)."""

    name = "destination-prober"
    failure_event = "destination_probe_failed"
    first_at_once = True

    def __init__(self, settings: Settings, interval: float = 60.0, timeout: float = 10.0) -> None:
        super().__init__()
        self.settings = settings
        self.interval_seconds = interval
        self.timeout = timeout
        self.join_seconds = timeout + 5
        self._results: dict[str, Reachability] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.destinations)

    def interval(self) -> float:
        return self.interval_seconds

    def run_once(self) -> None:
        self.probe_once()

    def results(self) -> dict[str, Reachability]:
        """The last result per destination name (none until its first probe ended)."""
        with self._lock:
            return dict(self._results)

    def probe_once(self) -> None:
        for dest in self.settings.destinations:
            calling = dest.calling_ae_title or self.settings.listener.ae_title
            try:
                ok, detail = reachable(dest, calling_ae_title=calling, timeout=self.timeout)
            except Exception as exc:  # a failing probe is an unreachable destination, never a dead thread
                ok, detail = False, f"probe failed: {type(exc).__name__}"
            before = self.results().get(dest.name)
            with self._lock:
                self._results[dest.name] = Reachability(ok, detail, time.time())
            if before is None or before.reachable != ok:
                (log.info if ok else log.warning)("destination_reachability", destination=dest.name,
                                                   reachable=ok, detail=detail)
