"""``dicom-node serve``: listener, catalog recorder, completion loop and (embedded) worker.

Start-up order matters for "nothing lost": clean temp files, record spooled instances the
catalog missed, re-enqueue unfinished jobs, and only then accept associations.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dicom_node.catalog import Catalog
from dicom_node.catalog.recorder import CatalogRecorder, reconcile_spool
from dicom_node.retention import RetentionLoop
from dicom_node.scheduling.completion import CompletionLoop
from dicom_node.scheduling.jobs import JobQueue, reconcile_jobs
from dicom_node.settings import Settings
from dicom_node.shadow import record_rule_modes

if TYPE_CHECKING:
    from dicom_node.web import WebServer

log = structlog.get_logger(__name__)

#: ``prctl`` option: the signal the kernel sends a process when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now out of the collector's reach
    (:func:`gc.freeze`); return how many objects are frozen.

    What start-up leaves (modules, SQLAlchemy's mappers, pynetdicom's and pydicom's tables:
    about 133,000 objects in the ingest benchmark's listener) lives as long as the process.
    Unfrozen, every full collection walks all of it while holding the interpreter lock, which
    stalls every association thread: 54 ms per full collection there, freeing nothing.  The
    price: a cycle among these objects that becomes garbage later is never freed (start-up's
    objects live as long as the process).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGKILL when the node dies (even by SIGKILL).

    Without it a killed ``serve`` leaves its worker consuming jobs, and each restart adds one.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere None.  The signal follows the thread
    that forked the child: :class:`WorkerProcess` spawns from the main thread at start and
    from its supervisor thread after a crash, and both live as long as the node does.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before prctl: nothing would kill us
            os._exit(1)

    return preexec


class WorkerProcess:
    """A ``dicom-node worker`` child process, restarted if it dies."""

    def __init__(self, config_path: Path | None, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "dicom_node", "worker"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        proc = subprocess.Popen(args, env=self.env, preexec_fn=_die_with_parent(os.getpid()))
        log.info("worker_started", pid=proc.pid)
        return proc

    def start(self) -> None:
        self.proc = self._spawn()
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("worker_exited", pid=self.proc.pid, returncode=self.proc.returncode)
                self.proc = self._spawn()
        # A child spawned here dies (SIGKILL) when this thread ends: end it first, gracefully.
        self._terminate()

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._terminate()


class Node:
    """Everything ``serve`` runs in one process, wired from one :class:`Settings`."""

    def __init__(self, settings: Settings, queue: JobQueue, *, config_path: Path | None = None,
                 broker_check: Callable[[], tuple[bool, str]] | None = None) -> None:
        from dicom_node.ingest.listener import Listener
        from dicom_node.ingest.spool import FileAccess, Spool
        from dicom_node.metrics import NodeMetrics

        self.settings = settings
        self.queue = queue
        self.catalog = Catalog(settings.database.url)
        self.spool = Spool(settings.storage.root, FileAccess.for_group(settings.storage.group))
        self.metrics = NodeMetrics(self.catalog, free_mb=self.spool.free_mb,
                                   min_free_mb=settings.storage.min_free_mb,
                                   learn_min_series=settings.completion.learn_min_series)
        self.recorder = CatalogRecorder(self.catalog, late_policy=settings.completion.late_instances.value,
                                        on_premature=self.metrics.premature_completion)
        self.listener = Listener(settings.listener, self.spool, self.recorder, settings.storage,
                                 metrics=self.metrics)
        self.completion = CompletionLoop(settings, self.catalog, queue)
        self.retention = RetentionLoop(settings, self.catalog)
        from dicom_node.scheduling.commitment import CommitmentLoop

        self.commitment = CommitmentLoop(settings, self.catalog)
        from dicom_node.delivery.probe import DestinationProber

        self.prober = DestinationProber(settings, interval=settings.delivery.probe_interval_seconds)
        self.metrics.watch_destinations(self.prober.results)
        self.worker: WorkerProcess | None = None
        if settings.run_in_process_worker:
            self.worker = WorkerProcess(config_path, dict(os.environ))
        self.web: WebServer | None = None
        if settings.web.enabled:
            from dicom_node.web import WebServer, create_app, readiness_checks

            app = create_app(settings, self.catalog, queue, metrics=self.metrics, destinations=self.prober.results,
                             readiness=readiness_checks(broker=broker_check, free_mb=self.spool.free_mb,
                                                        min_free_mb=settings.storage.min_free_mb,
                                                        listener=self.listener.readiness),
                             rejections=self.listener.rejections)
            self.web = WebServer(app, settings.web.host, settings.web.port)

    def start(self) -> None:
        self.spool.clean_temp_files()
        known = self.catalog.known_sop_instance_uids()
        recovered = reconcile_spool(self.catalog, self.spool.iter_instances(), known)
        # A series cut off by a crash waits a full idle period for its sender to resend the rest.
        self.catalog.restart_idle_clocks(time.time())
        requeued = reconcile_jobs(self.catalog, self.queue)
        # A rule whose mode changed since the last start (a shadow model promoted): audited.
        record_rule_modes(self.catalog, self.settings.rules)
        self.metrics.skip_history(self.catalog)
        self.recorder.start(known)  # the duplicate-UID check's index of what is stored
        del known
        self.completion.start()
        self.retention.start()
        self.commitment.start()
        self.prober.start()
        if self.worker is not None:
            self.worker.start()
        if self.web is not None:
            self.web.start()  # before the listener: /healthz answers first
        frozen = freeze_startup_heap()
        self.listener.start()
        log.info("node_started", ae_title=self.settings.listener.ae_title, host=self.settings.listener.host,
                 port=self.listener.port, recovered_instances=recovered, requeued_jobs=requeued,
                 frozen_objects=frozen,
                 in_process_worker=self.worker is not None, web_port=self.web.port if self.web else None)

    def stop(self) -> None:
        self.listener.stop()
        if self.web is not None:
            self.web.stop()
        self.recorder.stop()
        self.completion.stop()
        self.retention.stop()
        self.commitment.stop()
        self.prober.stop()
        if self.worker is not None:
            self.worker.stop()
        self.catalog.close()
        log.info("node_stopped")

    def serve_forever(self) -> None:
        stop = threading.Event()

        def _handler(signum: int, _frame: object) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        self.start()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
        time.sleep(0)
