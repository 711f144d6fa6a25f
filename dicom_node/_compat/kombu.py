"""kombu's SQLAlchemy transport with ``polling_interval`` as a transport option and a wake-up.

kombu's ``sqla`` channel passes every transport option it does not know to
``sqlalchemy.create_engine``, so ``broker_transport_options={"polling_interval": ...}`` - the
option every virtual transport reads - crashes the engine creation; :class:`Channel` keeps such
options away from it.

kombu's virtual transports poll: an empty poll of each queue is a ``BEGIN IMMEDIATE``
transaction on the SQLite broker, and a short interval (fast pick-up of a new job) made an idle
worker poll 20 times a second.  Here the consumer sleeps between polls on a Unix datagram socket
in a folder named after the broker database (``$TMPDIR/dicom-node-wake-<hash>/``) instead of
``time.sleep``, and
every publish (``serve`` queueing a job, a worker sending the dispatch task) sends one byte to
each socket there: a new message is picked up at once, and the polling interval can be long
(:data:`WAKE_POLLING_SECONDS`, a fallback for a lost wake-up) without a dead wait.  Brokers that
are not SQLite files (PostgreSQL through ``sqla+postgresql``) keep plain polling.

:func:`register` points the ``sqla`` alias at this transport.

A worker told to stop (SIGTERM: Celery's warm shutdown) would otherwise sleep out its current
wait and then one more: Celery's synchronous loop (the one a polling transport gets) runs a last
``drain_events(timeout=2.0)`` in a ``finally`` after it saw the stop flag, so every stop took up
to 4 s before the pool was even closed.  :func:`stop_consuming` (called from Celery's
``worker_shutting_down`` signal by ``workers.app``) wakes this process's sockets and makes
``drain_events`` return at once from then on, without fetching another message.

The private names of kombu used here, checked by ``tests/unit/test_compat.py``:
``sqlalchemy.Channel._engine_from_config`` and ``._put``, ``virtual.Channel.basic_ack`` /
``basic_reject``, ``virtual.Transport.drain_events`` with its ``cycle.get``, ``_deliver`` and
``polling_interval``, and ``kombu.transport.TRANSPORT_ALIASES``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import select
import socket
import tempfile
import uuid
import weakref
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

import structlog
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)

#: Transport options that are not ``create_engine`` arguments (kombu's list plus ours).
_NOT_ENGINE_OPTIONS = (
    "queue_tablename", "message_tablename", "callback", "errback", "max_retries",
    "interval_start", "interval_step", "interval_max", "retry_errors", "polling_interval",
)
#: Longest wait between two polls when the wake-up is in place (a publisher that could not
#: reach a socket is still seen within this time).
WAKE_POLLING_SECONDS = 2.0


def wake_dir(url: str) -> Path | None:
    """The folder of wake-up sockets for a SQLite broker URL (None for other databases).

    In the temporary folder, named by a hash of the database's real path, not next to the
    database: a Unix socket path has at most 107 bytes, which a deep data folder exceeds.
    """
    try:
        parsed = make_url(url)
    except Exception:  # an unparsable URL fails later, in create_engine, with its own message
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    key = hashlib.sha256(os.path.realpath(parsed.database).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dicom-node-wake-{key}"


def wake_consumers(folder: Path) -> int:
    """Send one byte to every consumer socket in ``folder``; return how many took it."""
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    woken = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for name in names:
            if not name.endswith(".sock"):
                continue
            path = folder / name
            try:
                sock.sendto(b"!", str(path))
                woken += 1
            except BlockingIOError:
                woken += 1  # its buffer is full of wake-ups already: it is awake
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:  # nobody bound: a consumer that died
                    with contextlib.suppress(OSError):
                        path.unlink()
    return woken


#: This process's consumer sockets (woken by :func:`stop_consuming`).
_SOCKETS: weakref.WeakSet[WakeSocket] = weakref.WeakSet()
#: Pid of the process that is stopping (a flag inherited through fork is not the child's).
_stopping_pid: int | None = None


def stop_consuming() -> None:
    """This process stops consuming: wake every consumer sleeping on one of its sockets now, and
    let ``drain_events`` return at once from here on (no message is fetched any more).

    Safe in a signal handler (a flag and a datagram to our own socket).
    """
    global _stopping_pid
    _stopping_pid = os.getpid()
    for wake in list(_SOCKETS):
        wake.poke()


def _stopping() -> bool:
    return _stopping_pid == os.getpid()


class WakeSocket:
    """The consumer's end: a bound datagram socket to sleep on between polls."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.pid = os.getpid()
        _SOCKETS.add(self)
        atexit.register(self.close)

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s, less when woken; swallow every queued wake-up."""
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if readable:
            with contextlib.suppress(OSError):
                while self.sock.recv(64):
                    pass

    def poke(self) -> None:
        """Wake this consumer up (from any thread of its process)."""
        if self.pid != os.getpid():  # inherited through fork: the parent's socket, not ours
            return
        with contextlib.suppress(OSError):
            self.sock.sendto(b"!", str(self.path))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class Channel(kombu_sqla.Channel):
    """The kombu SQLAlchemy channel, keeping non-engine options away from ``create_engine`` and
    waking the consumers after each publish."""

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS}
        return create_engine(conninfo.hostname, **options)

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        super()._put(queue, payload, **kwargs)  # type: ignore[no-untyped-call]
        folder = wake_dir(self.connection.client.hostname)
        if folder is not None:
            wake_consumers(folder)

    # A consumer that holds its prefetch limit (``worker_prefetch_multiplier = 1``: the task
    # running) does not fetch; the ack of that task frees it, so the ack wakes it up too, else
    # the next message (the dispatch task sent by that very task) waited for the fallback poll.
    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        self._poke()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        self._poke()

    def _poke(self) -> None:
        wake = getattr(self.connection, "_wake", None)
        if isinstance(wake, WakeSocket) and getattr(self.connection, "_wake_pid", None) == os.getpid():
            wake.poke()


class Transport(kombu_sqla.Transport):
    """The kombu SQLAlchemy transport with :class:`Channel` and a wake-up between polls."""

    Channel = Channel
    _wake: WakeSocket | None = None
    _wake_pid: int | None = None

    def _wake_socket(self) -> WakeSocket | None:
        if self._wake_pid != os.getpid():  # once per process, bound before the first poll
            folder = wake_dir(self.client.hostname) if self.client is not None else None
            if folder is None:
                return None
            try:
                self._wake = WakeSocket(folder)
            except OSError as exc:  # e.g. the folder belongs to another user: poll instead
                log.warning("broker_wake_socket_unavailable", folder=str(folder), error=str(exc))
                self._wake = None
            self._wake_pid = os.getpid()
        return self._wake

    def drain_events(self, connection: Any, timeout: float | None = None, **_: Any) -> Any:
        """kombu's loop (``virtual.Transport.drain_events``) sleeping on the wake socket."""
        wake = self._wake_socket()
        if wake is None or self.cycle is None:
            return super().drain_events(connection, timeout=timeout)  # type: ignore[no-untyped-call]
        time_start = monotonic()
        get = self.cycle.get
        interval = max(float(self.polling_interval or 0.0), WAKE_POLLING_SECONDS)
        while True:
            if _stopping():  # Celery's loop sees its stop flag once we return
                raise TimeoutError()
            try:
                get(self._deliver, timeout=timeout)  # type: ignore[no-untyped-call]
            except Empty:
                left = None if timeout is None else timeout - (monotonic() - time_start)
                if left is not None and left <= 0:
                    raise TimeoutError() from None
                wake.wait(interval if left is None else min(interval, left))
            else:
                return None


def register() -> None:
    """Make ``sqla+...`` (and ``sqlalchemy+...``) broker URLs use this transport."""
    TRANSPORT_ALIASES["sqla"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sqlalchemy"] = f"{__name__}:Transport"
