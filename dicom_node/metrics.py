"""Prometheus metrics of one node, on a registry the node owns (never the global default one).

Three sources feed it:

- the listener calls :meth:`NodeMetrics.instance_received`, :meth:`NodeMetrics.association` and
  :meth:`NodeMetrics.store_status` (counters, in-process);
- the catalog is read at scrape time by a custom collector: jobs by state, queue depth, oldest
  queued job, delivery failures per destination, live workers, free spool space;
- finished jobs are turned into histogram observations by :meth:`NodeMetrics.observe_finished_jobs`,
  which remembers the last job event it read, so each job is observed exactly once (at its first
  arrival in ``done``) however often it is called.  ``/metrics`` calls it before every scrape.

Per-stage timing is defined once, in :func:`stage_durations`, and shared with the REST API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dicom_node.catalog import Catalog, JobRow, JobState, SeriesRow, queries
from dicom_node.catalog.heartbeats import ALIVE_WITHIN_S
from dicom_node.catalog.tables import KEEPS_FIRST_INSTANCE

#: The stages of a job, in order, as the dashboard columns and the ``stage`` label name them.
STAGES: tuple[str, ...] = (
    "receive",
    "complete",
    "queued",
    "load",
    "inference",
    "encode",
    "deliver",
)
#: What each stage measures (shown in the API's OpenAPI description and in docs/operations.md).
STAGE_DEFINITIONS: dict[str, str] = {
    "receive": "first to last instance of the series received",
    "complete": "last instance received to series complete (quiet period or association end)",
    "queued": "job queued to a worker starting it",
    "load": "worker reading the series into a volume",
    "inference": "model prediction",
    "encode": "SEG + SR encoding",
    "deliver": "results encoded to delivered to every destination (dispatch queue + C-STORE)",
}
_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Buckets of ``dicom_node_delivery_confirmation_seconds``: a C-FIND after its delay, an archive
#: answering a storage commitment at once or after its own queue, a re-request after a time-out.
CONFIRMATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: From 0.5 s: a learned sender's series has its results within seconds (docs/performance.md),
#: so p50 / p95 need buckets below the old idle timer.
_E2E_BUCKETS = (0.5, 1, 1.5, 2, 3, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: Distinct calling AE titles kept as label values; more are counted as ``other`` so a peer
#: inventing AE titles cannot blow up the series count.
MAX_AE_LABELS = 64
_BATCH = 500


def _le(bound: float) -> str:
    return str(float(bound))


def _interval(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return end - start


def stage_durations(job: JobRow, series: SeriesRow | None) -> dict[str, float | None]:
    """Seconds spent in each of :data:`STAGES` (``None`` when not reached or not measurable).

    Times come from the latest attempt: a retried job shows the stages of its last run.
    """
    timings: dict[str, Any] = job.results.get("timings") or {}

    def timing(key: str) -> float | None:
        value = timings.get(key)
        return float(value) if isinstance(value, int | float) else None

    receive = complete = None
    if series is not None and series.generation == job.generation:
        receive = _interval(series.first_received_at, series.last_received_at)
        complete = _interval(series.last_received_at, series.completed_at)
    return {
        "receive": receive,
        "complete": complete,
        "queued": _interval(job.queued_at, job.running_at),
        "load": timing("load_s"),
        "inference": timing("inference_s"),
        "encode": timing("encode_s"),
        "deliver": _interval(job.encoded_at, job.done_at),
    }


def end_to_end_seconds(job: JobRow, last_received_at: float | None) -> float | None:
    """Last instance received to results delivered (``None`` until the job is done)."""
    if job.state != JobState.DONE.value:
        return None
    return _interval(last_received_at, job.done_at)


class _CatalogCollector(Collector):
    """Gauges read from the catalog at scrape time (nothing cached, nothing to drift)."""

    def __init__(
        self, catalog: Catalog, free_mb: Callable[[], float] | None, min_free_mb: float | None,
        learn_min_series: int = 5,
    ) -> None:
        self.catalog = catalog
        self.free_mb = free_mb
        self.min_free_mb = min_free_mb
        self.learn_min_series = learn_min_series

    def describe(self) -> Iterable[Any]:
        # Describing without querying keeps registration cheap and the database out of start-up.
        return []

    def collect(self) -> Iterator[Any]:
        now = time.time()
        by_state = GaugeMetricFamily(
            "dicom_node_jobs", "Jobs in the catalog by state.", labels=["state"]
        )
        depth = GaugeMetricFamily(
            "dicom_node_queue_depth",
            "Jobs waiting in a queue (queued: inference, encoded: dispatch).",
            labels=["queue", "priority"],
        )
        oldest = GaugeMetricFamily(
            "dicom_node_queue_oldest_age_seconds",
            "Age of the oldest job waiting in a queue (0 when empty).",
            labels=["queue"],
        )
        failures = CounterMetricFamily(
            "dicom_node_delivery_failures",
            "Failed delivery attempts per destination (from the catalog).",
            labels=["destination"],
        )
        workers = GaugeMetricFamily(
            "dicom_node_workers_alive",
            f"Worker processes with a heartbeat in the last {ALIVE_WITHIN_S:g} s.",
            labels=["queue"],
        )
        counts = self.catalog.count_jobs_by_state()
        for state in JobState:
            by_state.add_metric([state.value], counts.get(state.value, 0))
        waiting = self.catalog.queue_depth()
        oldest_at: dict[str, float] = {}
        seen: set[tuple[str, str]] = set()
        for (queue, priority), (n, first) in waiting.items():
            depth.add_metric([queue, priority], n)
            seen.add((queue, priority))
            oldest_at[queue] = min(first, oldest_at.get(queue, first))
        for queue, priority in (
            ("inference", "normal"),
            ("inference", "urgent"),
            ("dispatch", "normal"),
        ):
            if (queue, priority) not in seen:
                depth.add_metric([queue, priority], 0)
        for queue in ("inference", "dispatch"):
            oldest.add_metric(
                [queue], max(0.0, now - oldest_at[queue]) if queue in oldest_at else 0.0
            )
        # Every attempt that did not end in success was a failure.
        for destination, n in queries.failed_delivery_attempts(self.catalog).items():
            failures.add_metric([destination], float(n))
        alive: dict[str, int] = {"inference": 0, "dispatch": 0}
        for queues in queries.queues_of_live_workers(self.catalog, now - ALIVE_WITHIN_S):
            for queue in filter(None, queues.split(",")):
                alive[queue] = alive.get(queue, 0) + 1
        for queue, n in sorted(alive.items()):
            workers.add_metric([queue], n)
        unconfirmed = GaugeMetricFamily(
            "dicom_node_delivery_unconfirmed",
            "Delivered objects a C-FIND verification did not find, or a storage commitment did not "
            'confirm, at the destination (commitment = "find" / "storage-commitment"), per destination.',
            labels=["destination"],
        )
        for destination, n in sorted(queries.unconfirmed_objects(self.catalog).items()):
            unconfirmed.add_metric([destination], float(n))
        keeps_first = GaugeMetricFamily(
            "dicom_node_destination_keeps_first_instance",
            "1 for a destination seen to keep the first object of a SOP Instance UID: a re-run's "
            "corrected results (same UIDs) did not replace the earlier ones there.",
            labels=["destination"],
        )
        for destination in sorted(queries.destination_findings(self.catalog, KEEPS_FIRST_INSTANCE)):
            keeps_first.add_metric([destination], 1.0)
        yield from (by_state, depth, oldest, failures, workers, unconfirmed, keeps_first,
                    self._confirmation())
        yield from self._senders()
        if self.free_mb is not None:
            yield GaugeMetricFamily(
                "dicom_node_spool_free_bytes",
                "Free space on the spool filesystem.",
                value=self.free_mb() * 1024 * 1024,
            )
        if self.min_free_mb is not None:
            yield GaugeMetricFamily(
                "dicom_node_spool_min_free_bytes",
                "Watermark below which C-STORE is refused (storage.min_free_mb).",
                value=self.min_free_mb * 1024 * 1024,
            )


    def _confirmation(self) -> HistogramMetricFamily:
        """``dicom_node_delivery_confirmation_seconds``, built from the catalog at each scrape
        (the confirmations happen in workers and in the commitment loop, not in this process)."""
        family = HistogramMetricFamily(
            "dicom_node_delivery_confirmation_seconds",
            "Seconds from the C-STORE success to the confirmation of each confirmed object "
            '(C-FIND for commitment = "find", the N-EVENT-REPORT for "storage-commitment"), '
            "per destination.",
            labels=["destination"],
        )
        for destination, values in sorted(queries.confirmation_seconds(self.catalog).items()):
            buckets = [(_le(b), float(sum(1 for v in values if v <= b))) for b in CONFIRMATION_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            family.add_metric([destination], buckets, sum_value=sum(values))
        return family

    def _senders(self) -> Iterator[Any]:
        """Per sender (calling AE title, rule): completion mode, split rate, history size."""
        from dicom_node.catalog.senders import sender_stats

        labels = ["calling_ae", "rule"]
        mode = GaugeMetricFamily(
            "dicom_node_sender_completes_at_release",
            "1 when the sender's series without a count complete at association release "
            "(learned: no split series in its history), 0 when they wait for the idle timer.",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            "dicom_node_sender_split_rate",
            "Share of the sender's remembered series that continued in a later association.",
            labels=labels,
        )
        size = GaugeMetricFamily(
            "dicom_node_sender_history_series", "Completed series remembered for the sender.", labels=labels
        )
        for (ae, rule), st in sorted(sender_stats(self.catalog, self.learn_min_series).items())[:MAX_AE_LABELS]:
            mode.add_metric([ae, rule], 1.0 if st.mode == "association" else 0.0)
            rate.add_metric([ae, rule], st.split_rate)
            size.add_metric([ae, rule], st.series)
        yield from (mode, rate, size)


class NodeMetrics:
    """The node's metrics: listener counters, catalog gauges and per-job histograms.

    Parameters
    ----------
    catalog : Catalog, optional
        Read at scrape time for the gauges; without it only the listener counters and the
        histograms are exposed.
    free_mb : callable, optional
        Free spool space in MiB (``Spool.free_mb``), exposed with ``min_free_mb`` as watermark.
    min_free_mb : float, optional
        ``storage.min_free_mb``.
    """

    def __init__(
        self,
        catalog: Catalog | None = None,
        *,
        free_mb: Callable[[], float] | None = None,
        min_free_mb: float | None = None,
        learn_min_series: int = 5,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "dicom_node_instances_received",
            "Instances stored (C-STORE success).",
            ["calling_ae"],
            registry=r,
        )
        self.bytes_received = Counter(
            "dicom_node_bytes_received", "Bytes of stored instances.", ["calling_ae"], registry=r
        )
        self.associations = Counter(
            "dicom_node_associations",
            "Associations by outcome (accepted, rejected, released, aborted).",
            ["calling_ae", "result"],
            registry=r,
        )
        self.store_statuses = Counter(
            "dicom_node_store_status", "C-STORE responses by status (hex).", ["status"], registry=r
        )
        self.stage_seconds = Histogram(
            "dicom_node_stage_seconds",
            "Seconds per job stage, observed once per job when it is done.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "dicom_node_end_to_end_seconds",
            "Last instance received to results delivered, once per job, by model.",
            ["model"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "dicom_node_inference_seconds",
            "Model prediction seconds per job (worker timings), by model.",
            ["model"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.catalog = catalog
        if catalog is not None:
            r.register(_CatalogCollector(catalog, free_mb, min_free_mb, learn_min_series))
        self.premature_completions = Counter(
            "dicom_node_premature_completions",
            "Series completed at association release that then received another instance "
            "(the sender goes back to the idle timer).",
            ["calling_ae"],
            registry=r,
        )
        self._last_event_id = 0
        self._observe_lock = threading.Lock()
        self._ae_lock = threading.Lock()
        self._ae_titles: set[str] = set()

    def watch_destinations(self, results: Callable[[], Mapping[str, Any]]) -> None:
        """Expose ``dicom_node_destination_reachable{destination}`` (1 or 0) from the last probe
        of each destination (``results``: name -> object with a ``reachable`` flag)."""

        class _Destinations(Collector):
            def collect(self) -> Iterator[GaugeMetricFamily]:
                gauge = GaugeMetricFamily(
                    "dicom_node_destination_reachable",
                    "1 when the destination answered its last probe (C-ECHO or QIDO-RS), else 0.",
                    labels=["destination"],
                )
                for name, result in sorted(results().items()):
                    gauge.add_metric([name], 1.0 if result.reachable else 0.0)
                yield gauge

        self.registry.register(_Destinations())

    # -- called by the listener ------------------------------------------------------------

    def _ae(self, calling_ae: str) -> str:
        calling_ae = calling_ae.strip()
        with self._ae_lock:
            if calling_ae in self._ae_titles:
                return calling_ae
            if len(self._ae_titles) < MAX_AE_LABELS:
                self._ae_titles.add(calling_ae)
                return calling_ae
        return "other"

    def premature_completion(self, calling_ae: str) -> None:
        """Count a series completed at release that then received another instance."""
        self.premature_completions.labels(self._ae(calling_ae)).inc()

    def instance_received(self, calling_ae: str, nbytes: int) -> None:
        """Count one stored instance of ``nbytes`` bytes from ``calling_ae``."""
        ae = self._ae(calling_ae)
        self.instances_received.labels(ae).inc()
        self.bytes_received.labels(ae).inc(nbytes)

    def association(self, calling_ae: str, result: str) -> None:
        """Count an association event (``accepted``, ``rejected``, ``released``, ``aborted``)."""
        self.associations.labels(self._ae(calling_ae), result).inc()

    def store_status(self, status: int) -> None:
        """Count one C-STORE response with DIMSE ``status`` (label ``0x0000`` style)."""
        self.store_statuses.labels(f"0x{status:04X}").inc()

    # -- finished jobs -----------------------------------------------------------------------

    def skip_history(self, catalog: Catalog) -> None:
        """Start observing after the newest existing job event (call once at node start-up, so
        a restart does not replay every job ever done into the histograms)."""
        newest = queries.newest_job_event_id(catalog)
        with self._observe_lock:
            self._last_event_id = max(self._last_event_id, newest)

    def observe_finished_jobs(self, catalog: Catalog | None = None) -> int:
        """Observe the histograms for jobs that reached ``done`` since the last call.

        Each job counts once, at its first ``done`` event (a job re-run after ``done`` is not
        observed again).  Returns how many jobs were observed.
        """
        catalog = catalog or self.catalog
        if catalog is None:
            raise ValueError("observe_finished_jobs needs a catalog: none given and none attached")
        observed = 0
        with self._observe_lock:
            for event_id, finished in queries.first_done_events(catalog, self._last_event_id, _BATCH):
                if finished is not None:
                    self._observe_job(finished)
                    observed += 1
                self._last_event_id = event_id
        return observed

    def _observe_job(self, finished: queries.FinishedJob) -> None:
        job, series = finished.job, finished.series
        for stage, seconds in stage_durations(job, series).items():
            if seconds is not None:
                self.stage_seconds.labels(stage).observe(seconds)
        inference = stage_durations(job, None)["inference"]
        if inference is not None:
            self.inference_seconds.labels(job.model).observe(inference)
        e2e = _interval(finished.last_instance_at, job.done_at)
        if e2e is not None:
            self.end_to_end_seconds.labels(job.model).observe(e2e)

    # -- exposition --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (observing newly finished jobs first)."""
        if self.catalog is not None:
            self.observe_finished_jobs(self.catalog)
        return generate_latest(self.registry)
