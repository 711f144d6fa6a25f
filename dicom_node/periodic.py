"""One background thread that does a pass of work every so many seconds, until stopped.

The periodic loops of ``serve`` (completion, retention, storage commitment, destination probes)
share this skeleton: started only when :attr:`PeriodicLoop.enabled`, a daemon thread that waits
:meth:`PeriodicLoop.interval` seconds on a stop event, then calls :meth:`PeriodicLoop.run_once`;
an exception of a pass is logged (``failure_event``) and the next pass runs as usual: the state
lives in the catalog, so a pass that failed is simply retried.  :meth:`PeriodicLoop.stop` wakes
the wait at once and joins the thread for at most ``join_seconds``.
"""

from __future__ import annotations

import threading

import structlog


class PeriodicLoop:
    """Calls :meth:`run_once` every :meth:`interval` seconds in a daemon thread named ``name``.

    Subclasses set ``name`` and ``failure_event`` and implement :meth:`run_once` and
    :meth:`interval` (read before every wait, so it may change between passes); they may
    override :attr:`enabled`, ``join_seconds`` and ``first_at_once`` (a first pass at start,
    before the first wait).
    """

    #: The thread's name.
    name: str = "periodic"
    #: Logged (with the traceback, by the subclass's module logger) when a pass raises.
    failure_event: str = "periodic_pass_failed"
    #: How long :meth:`stop` waits for a running pass to end.
    join_seconds: float = 30.0
    #: Run a first pass as soon as the thread starts (else after the first interval).
    first_at_once: bool = False

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The subclass's module name, so its events keep the logger (and level) they always had.
        self._log = structlog.get_logger(type(self).__module__)

    @property
    def enabled(self) -> bool:
        """Whether :meth:`start` starts the thread at all."""
        return True

    def interval(self) -> float:
        """Seconds to wait before the next pass."""
        raise NotImplementedError

    def run_once(self) -> None:
        """One pass of work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the thread, if :attr:`enabled` and not started yet."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the thread: no pass starts after this; a running one gets ``join_seconds``."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=self.join_seconds)

    def _run(self) -> None:
        if self.first_at_once and not self._stop.is_set():
            self._pass()
        while not self._stop.wait(self.interval()):
            self._pass()

    def _pass(self) -> None:
        try:
            self.run_once()
        except Exception:  # process boundary: the state is kept elsewhere, the next pass retries
            self._log.exception(self.failure_event)
