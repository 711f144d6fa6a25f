"""Worker heartbeats from Celery signals into the catalog (``dicom_node.catalog.heartbeats`` table).

``install_heartbeat(app, catalog_url)`` connects the handlers; ``workers.app`` calls it for the
worker side.  Every worker process keeps its own row fresh from a daemon thread:

- the main process from ``worker_ready`` (it consumes; the pool runs the tasks),
- each pool child from ``worker_process_init`` (with ``--pool solo`` that is the main process,
  and one thread serves both),
- ``task_prerun`` / ``task_postrun`` record the job a process is running and clear it after,
- every beat (and every ``task_postrun``) carries the models the process holds warm, from the
  ``warm_models`` callable ``workers.app`` gives (the model registry of the process),
- ``worker_process_shutdown`` / ``worker_shutdown`` delete the rows (a killed process simply
  stops beating and ages out).

A database outage never stops a worker: a failed heartbeat is logged and retried next beat.

A process beats only while it can open the broker as it must to work (:func:`probe_broker`: for
the embedded SQLite broker, a write transaction on the file; else a connection).  A worker that
cannot reach its broker gets no jobs, so it does not count as alive: ``/readyz`` reports
``inference_worker`` failing even when the node itself reaches the broker (another user,
another path, another host).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import structlog
from celery import Celery, signals

from dicom_node.catalog import Catalog
from dicom_node.catalog import heartbeats as heartbeat

log = structlog.get_logger(__name__)

#: Seconds between heartbeats; readiness wants one within ``heartbeat.ALIVE_WITHIN_S`` (30 s).
DEFAULT_INTERVAL_S = 5.0
#: Longest a fork of a worker process waits for a heartbeat in progress to end.
FORK_WAIT_S = 60.0


class _Heartbeats:
    """Signal handlers for one Celery app; state survives fork into pool children on purpose."""

    def __init__(
        self, app: Celery, catalog_url: str, interval_s: float,
        warm_models: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.app = app
        self.warm_models = warm_models
        self.catalog_url = catalog_url
        self.interval_s = interval_s
        self.hostname: str | None = None
        self.queues: tuple[str, ...] = ()
        settings = getattr(app, "dicom_node_settings", None)
        self.device: str | None = settings.worker.device if settings is not None else None
        self._pid: int | None = None
        self._catalog: Catalog | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._broker_ok = True
        # Held for the whole of each beat (broker probe and catalog write) and by every fork of
        # this process, so that a fork never happens in the middle of a beat.  The prefork pool
        # forks a replacement process from the worker's main process while that process's
        # heartbeat thread may be inside SQLite (or kombu, redis-py): the library's own locks
        # (SQLite's mutexes, kombu's cached_property lock) were copied held by a thread that
        # does not exist in the child, and the child's first use of them blocked forever.  Seen
        # as a replacement pool process stuck in ``sqlite3.connect`` before its warm-up (the
        # redelivered job never started: "Timed out waiting for UP message"), 1 in about 30
        # replacements under CPU load.  The first pool processes are forked before the
        # heartbeat thread starts; only replacements (a killed or recycled process) were hit.
        self._beating = threading.Lock()
        self._beating_at_fork = False
        os.register_at_fork(
            before=self._before_fork, after_in_parent=self._after_fork_in_parent,
            after_in_child=self._after_fork,
        )

    def _before_fork(self) -> None:
        # Bounded: a beat waits at most for the broker probe's timeout and the catalog's busy
        # timeout; a fork is never held up for good by a database that does not answer.
        self._beating_at_fork = self._beating.acquire(timeout=FORK_WAIT_S)

    def _after_fork_in_parent(self) -> None:
        if self._beating_at_fork:
            self._beating_at_fork = False
            self._beating.release()

    def _after_fork(self) -> None:
        # A lock held by the parent's heartbeat thread at fork time would stay held forever in
        # the child: give the child fresh synchronisation objects.
        self._lock = threading.Lock()
        self._beating = threading.Lock()
        self._beating_at_fork = False
        self._stop = threading.Event()
        self._thread = None

    # -- per-process resources (re-created after fork) ---------------------------------------

    def catalog(self) -> Catalog:
        pid = os.getpid()
        with self._lock:
            if self._pid != pid or self._catalog is None:
                if self._catalog is not None:
                    # Inherited from the parent: drop its pooled connections without closing
                    # them under the parent's feet.
                    self._catalog.engine.dispose(close=False)
                self._catalog = Catalog(self.catalog_url)
                self._pid = pid
                self._stop = threading.Event()
                self._thread = None
            return self._catalog

    def _beat_once(self) -> None:
        if self.hostname is None:
            return
        with self._beating:  # no fork of this process in the middle of a beat (see __init__)
            self._beat_locked(self.hostname)

    def _beat_locked(self, hostname: str) -> None:
        ok, detail = probe_broker(self.app)
        if not ok:
            # No beat: a worker that cannot reach its broker gets no jobs (see module doc).
            if self._broker_ok:
                log.error("worker_broker_unreachable", hostname=hostname, detail=detail)
            self._broker_ok = False
            return
        if not self._broker_ok:
            log.info("worker_broker_reachable", hostname=hostname)
            self._broker_ok = True
        try:
            heartbeat.beat(
                self.catalog(), hostname, os.getpid(), queues=self.queues, device=self.device,
                warm_models=self._warm(),
            )
        except Exception as exc:  # thread boundary: the worker keeps working without its heartbeat
            log.warning(
                "heartbeat_failed", hostname=hostname, error=f"{type(exc).__name__}: {exc}"
            )

    def _warm(self) -> list[dict[str, Any]] | None:
        if self.warm_models is None:
            return None
        try:
            return self.warm_models()
        except Exception as exc:  # the heartbeat must go on even if the registry cannot say
            log.warning("heartbeat_warm_models_failed", error=f"{type(exc).__name__}: {exc}")
            return None

    def _run(self) -> None:
        stop = self._stop
        while True:
            self._beat_once()
            if stop.wait(self.interval_s):
                return

    def start_thread(self) -> None:
        """Start this process's heartbeat thread (once per process)."""
        self.catalog()
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
            self._thread.start()

    def stop_thread(self, *, remove_all: bool) -> None:
        self._stop.set()
        if self.hostname is None or self._catalog is None or self._pid != os.getpid():
            return
        try:
            heartbeat.remove(self._catalog, self.hostname, None if remove_all else os.getpid())
        except Exception as exc:  # shutting down: nothing more to do than say so
            log.warning(
                "heartbeat_remove_failed",
                hostname=self.hostname,
                error=f"{type(exc).__name__}: {exc}",
            )

    # -- signal handlers -----------------------------------------------------------------------

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        owner = getattr(sender, "app", None)
        if owner is None or owner is not self.app:
            return
        self.hostname = str(sender.hostname)
        amqp_queues: Any = owner.amqp.queues
        selected = getattr(amqp_queues, "consume_from", None) or amqp_queues
        self.queues = tuple(sorted(str(q) for q in selected))

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app and self.hostname is not None:
            self.start_thread()
            log.info(
                "worker_heartbeat_started",
                hostname=self.hostname,
                queues=",".join(self.queues),
                interval_s=self.interval_s,
            )

    def on_process_init(self, sender: Any = None, **_: Any) -> None:
        if self.hostname is not None and str(sender) == self.hostname:
            self.start_thread()

    def _is_ours(self, task: Any) -> bool:
        return self.hostname is not None and getattr(task, "app", None) is self.app

    def on_task_prerun(
        self, sender: Any = None, task: Any = None, args: Any = None, **_: Any
    ) -> None:
        task = task or sender
        if not self._is_ours(task) or self.hostname is None:
            return
        job_id = args[0] if args and isinstance(args[0], int) else None
        model = None
        if job_id is not None:
            try:
                job = self.catalog().get_job(job_id)
                model = job.model if job is not None else None
            except Exception as exc:  # the heartbeat must never fail a task
                log.warning(
                    "heartbeat_job_lookup_failed",
                    job_id=job_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
        if not str(task.name).endswith("inference"):
            model = "dispatch"  # delivering results: no model runs
        self._set_current(job_id, model)

    def on_task_postrun(self, sender: Any = None, task: Any = None, **_: Any) -> None:
        task = task or sender
        if not self._is_ours(task):
            return
        # The model registry resolved the device ("auto" -> "cuda:0") while running the task.
        ctx = getattr(task, "_ctx", None)
        device = getattr(getattr(ctx, "registry", None), "device", None)
        if device is not None:
            self.device = str(device)
        self._set_current(None, None)

    def _set_current(self, job_id: int | None, model: str | None) -> None:
        if self.hostname is None:
            return
        with self._beating:  # a catalog write, like a beat (see __init__)
            self._set_current_locked(self.hostname, job_id, model)

    def _set_current_locked(self, hostname: str, job_id: int | None, model: str | None) -> None:
        try:
            heartbeat.set_current_job(
                self.catalog(),
                hostname,
                os.getpid(),
                job_id,
                model,
                queues=self.queues,
                device=self.device,
                warm_models=self._warm(),
            )
        except Exception as exc:  # never fail a task because the dashboard cannot be told
            log.warning(
                "heartbeat_failed", hostname=self.hostname, error=f"{type(exc).__name__}: {exc}"
            )

    def on_process_shutdown(self, sender: Any = None, **_: Any) -> None:
        if self.hostname is not None and str(sender) == self.hostname:
            self.stop_thread(remove_all=False)

    def on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            self.stop_thread(remove_all=True)


def install_heartbeat(
    app: Celery, catalog_url: str, *, interval_s: float = DEFAULT_INTERVAL_S,
    warm_models: Callable[[], list[dict[str, Any]]] | None = None,
) -> None:
    """Connect the heartbeat signal handlers for ``app`` (call once, on the worker side);
    ``warm_models`` says which models the calling process holds (reported with each beat)."""
    hb = _Heartbeats(app, catalog_url, interval_s, warm_models)
    app.dicom_node_heartbeats = hb  # reachable for tests and debugging
    # weak=False: the handlers are bound methods of an object nothing else holds strongly.
    connections: list[tuple[Any, Callable[..., None]]] = [
        (signals.worker_init, hb.on_worker_init),
        (signals.worker_ready, hb.on_worker_ready),
        (signals.worker_process_init, hb.on_process_init),
        (signals.task_prerun, hb.on_task_prerun),
        (signals.task_postrun, hb.on_task_postrun),
        (signals.worker_process_shutdown, hb.on_process_shutdown),
        (signals.worker_shutdown, hb.on_worker_shutdown),
    ]
    for signal, handler in connections:
        signal.connect(handler, weak=False)


def sqlite_broker_path(url: str) -> str | None:
    """The file of an embedded SQLite broker URL (``sqla+sqlite:///path``), else None."""
    for prefix in ("sqla+sqlite:///", "sqlalchemy+sqlite:///"):
        if url.startswith(prefix):
            return unquote(url[len(prefix):].split("?", 1)[0]) or None
    return None


def probe_broker(app: Celery, timeout_s: float = 2.0) -> tuple[bool, str]:
    """Open the broker of ``app`` as a worker must to take jobs: (ok, detail).

    The embedded SQLite broker is opened afresh and a write transaction begun and rolled back
    (a worker deletes the messages it takes: a file it can read but not write, a folder it
    cannot create the journal in, a path that is a folder all fail here, as they fail the
    worker).  kombu opens such a file lazily, so a mere connection would always succeed.  Any
    other broker must accept a connection within ``timeout_s``.
    """
    url = str(app.conf.broker_url or "")
    scheme = url.split("://", 1)[0]
    path = sqlite_broker_path(url)
    try:
        if path is not None:
            conn = sqlite3.connect(path, timeout=timeout_s)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
            finally:
                conn.close()
        else:
            with app.connection_for_write() as kombu_conn:
                kombu_conn.ensure_connection(
                    max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s
                )
    except Exception as exc:  # any failure to open is "not reachable", with the reason
        return False, f"broker ({scheme}) unreachable: {type(exc).__name__}: {exc}"
    return True, f"broker ({scheme}) reachable"


def broker_check(app: Celery, timeout_s: float = 2.0) -> Callable[[], tuple[bool, str]]:
    """A ``/readyz`` check: :func:`probe_broker` from the node (the workers' own view is in
    their heartbeats: they stop beating while their probe fails)."""
    return lambda: probe_broker(app, timeout_s)
