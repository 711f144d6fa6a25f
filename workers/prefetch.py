"""Load the next job's series while the current job's model runs (``[worker] prefetch``).

Celery hands a worker one message at a time (prefetch multiplier 1, ``acks_late``), so the
worker cannot learn its next job from the broker.  It asks the catalog instead: after a job's
series is loaded, :meth:`Prefetcher.start` picks the queued job most likely to come next (urgent
before normal, then oldest queued first: the order the broker serves them in) whose model this
worker has, and loads that series in one background thread while the model runs.  When the
task for that job arrives, :meth:`Prefetcher.take` hands the volume over if it was loaded from
exactly the files the catalog lists now (same paths, sizes and modification times); anything
else is discarded and the job loads its series itself, so a stale volume is never used.

Memory stays bounded: the prefetcher holds one volume at most (loaded or being loaded), and
drops it before loading another, so a worker process holds the current job's volume and one
more.  A failed prefetch is never an error of the job: the job's own load reports it.  Loading
is CPU work (``dicom_node.imaging.loading``); the model picks its device, so this is the same for CPU
and CUDA workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from dicom_node.catalog import Catalog, JobRow
from dicom_node.imaging.loading import LoadedSeries, load_series

log = structlog.get_logger(__name__)

Loader = Callable[[Sequence[Path]], LoadedSeries]


@dataclass(frozen=True)
class SeriesFiles:
    """The exact files a volume is loaded from: (path, size, mtime in ns) of each, in order."""

    files: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, paths: Sequence[Path]) -> SeriesFiles:
        """Stat every file now; a file that is gone is recorded as size and mtime -1."""
        out = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                out.append((str(path), -1, -1))
                continue
            out.append((str(path), st.st_size, st.st_mtime_ns))
        return cls(tuple(out))


@dataclass(frozen=True)
class Taken:
    """What :meth:`Prefetcher.take` found for a job."""

    #: The prefetched series, or None: the job loads its series itself.
    loaded: LoadedSeries | None
    #: Seconds the job waited for the prefetch of its own series to finish.
    wait_s: float
    #: Seconds the background thread spent loading it (0 when nothing was taken).
    load_s: float
    #: Why nothing was taken (empty when ``loaded`` is set).
    reason: str = ""


@dataclass
class _Slot:
    job_id: int
    files: SeriesFiles
    loaded: LoadedSeries | None  # None: the load failed
    load_s: float
    error: str = ""


def next_queued_job(catalog: Catalog, models: Collection[str], *, exclude: Collection[int] = ()) -> JobRow | None:
    """The queued job a worker serving ``models`` most likely gets next, or None.

    Urgent before normal, then the oldest ``queued_at`` (the broker's order); jobs in
    ``exclude`` (the one running here) are skipped.
    """
    return catalog.next_queued_job(models, exclude)


class Prefetcher:
    """One background thread that keeps the series of the likely next job loaded (one slot).

    Parameters
    ----------
    catalog:
        Where queued jobs and their instance paths are found.
    models:
        The models this worker can run; jobs for other models are never prefetched.
    load:
        The loader (:func:`dicom_node.imaging.loading.load_series`; tests pass a wrapper).
    """

    def __init__(self, catalog: Catalog, models: Collection[str], *, load: Loader = load_series) -> None:
        self._catalog = catalog
        self._models = frozenset(models)
        self._load = load
        self._cond = threading.Condition()
        self._request: int | None = None  # job id after which to prefetch (latest wins)
        self._busy = False  # the thread is choosing a job or loading one
        self._loading: int | None = None  # job whose series the thread is loading now
        self._slot: _Slot | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- the job's side -------------------------------------------------------------------

    def start(self, current_job_id: int) -> None:
        """Prefetch the series of the job most likely to run after ``current_job_id``.

        Returns at once; the catalog query and the load run in the background thread.  While a
        load is under way a new request waits for it (one load at a time).
        """
        with self._cond:
            if self._closed:
                return
            self._request = current_job_id
            if self._thread is None:
                # Started on first use: after the pool process forked, like the models.
                self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, job: JobRow, paths: Sequence[Path]) -> Taken:
        """The prefetched series of ``job`` if it was loaded from exactly ``paths`` as they are now.

        Waits while the background thread is loading this very job.  A volume prefetched for
        this job from other files (a late instance arrived, a file was re-sent) is discarded; a
        volume prefetched for another job is kept (it may be the next one).
        """
        t0 = time.perf_counter()
        with self._cond:
            # Wait while the thread loads this job, or is about to choose one (a catalog query).
            self._cond.wait_for(lambda: self._closed or not (
                (self._busy and self._loading in (None, job.id))
                or (self._request is not None and not self._busy)))
            waited = time.perf_counter() - t0
            slot = self._slot
            if slot is None or slot.job_id != job.id:
                return Taken(None, waited, 0.0, "not prefetched")
            self._slot = None
        if slot.loaded is None:
            return Taken(None, waited, 0.0, f"prefetch failed: {slot.error}")
        if slot.files != SeriesFiles.of(paths):
            log.info("prefetch_discarded", job_id=job.id, series_instance_uid=job.series_instance_uid,
                     reason="instances changed since the prefetch")
            return Taken(None, waited, 0.0, "instances changed since the prefetch")
        return Taken(slot.loaded, waited, slot.load_s)

    def held_job_id(self) -> int | None:
        """The job whose series is held (loaded or being loaded), if any."""
        with self._cond:
            if self._loading is not None:
                return self._loading
            return self._slot.job_id if self._slot is not None else None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is pending and no load runs; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._request is None and not self._busy, timeout)

    def close(self) -> None:
        """Stop the thread (after its current load) and drop the held volume."""
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- the background thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._request is not None or self._closed)
                if self._closed:
                    return
                current = self._request
                assert current is not None  # the wait ended on a request
                self._request, self._busy = None, True
            try:
                self._prefetch_after(current)
            except Exception:  # thread boundary: a prefetch never fails a job, the job's own load will
                log.exception("prefetch_crashed", after_job_id=current)
            finally:
                with self._cond:
                    self._busy, self._loading = False, None
                    self._cond.notify_all()

    def _prefetch_after(self, current: int) -> None:
        job = next_queued_job(self._catalog, self._models, exclude={current})
        if job is None:
            return
        paths = self._catalog.series_paths(job.series_instance_uid)
        if not paths:
            return
        files = SeriesFiles.of(paths)
        with self._cond:
            held = self._slot
            if held is not None and held.job_id == job.id and held.files == files:
                return  # already loaded from these very files
            # One volume at most: drop the held one before loading another.
            self._slot = held = None
            if self._closed:
                return
            self._loading = job.id
            self._cond.notify_all()  # a take() for another job need not wait any longer
        bound = log.bind(job_id=job.id, series_instance_uid=job.series_instance_uid)
        t0 = time.perf_counter()
        try:
            loaded: LoadedSeries | None = self._load(paths)
            error = ""
        except Exception as exc:  # thread boundary: the job's own load reports the real error
            loaded, error = None, f"{type(exc).__name__}: {exc}"
            bound.info("prefetch_failed", error=error[:300])
        load_s = time.perf_counter() - t0
        with self._cond:
            if not self._closed:
                self._slot = _Slot(job.id, files, loaded, load_s, error)
        if loaded is not None:
            bound.info("series_prefetched", load_s=round(load_s, 3), after_job_id=current)
