"""Drift on ``/metrics``: PSI per (model, scanner, feature), the alert per pair, scanners' last
series.  Labels are bounded: models are configured, scanners capped at ``drift.max_scanners``
(+ ``other``), features a fixed set plus the models' label names."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dicom_node.drift.monitor import DriftMonitor


class DriftCollector(Collector):
    """Read the monitor's (cached) report at scrape time."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> Iterable[Any]:
        return []  # no database query at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.monitor.report()
        value = GaugeMetricFamily(
            "dicom_node_drift_psi",
            "Population stability index of a feature: recent window against the baseline, per model and scanner.",
            labels=["model", "scanner", "feature"])
        alert = GaugeMetricFamily(
            "dicom_node_drift_alert",
            "1 when a feature of the model on the scanner drifted beyond drift.psi_alert, else 0.",
            labels=["model", "scanner"])
        jobs = GaugeMetricFamily(
            "dicom_node_drift_window_jobs", "Observations in the baseline and the recent window.",
            labels=["model", "scanner", "window"])
        for pair in report.pairs:
            alert.add_metric([pair.model, pair.scanner], 1.0 if pair.alert else 0.0)
            jobs.add_metric([pair.model, pair.scanner, "baseline"], pair.baseline_n)
            jobs.add_metric([pair.model, pair.scanner, "recent"], pair.recent_n)
            for f in pair.features:
                value.add_metric([pair.model, pair.scanner, f.feature], f.psi)
        seen = GaugeMetricFamily(
            "dicom_node_scanner_last_seen_timestamp",
            "Unix time of the newest series of a tracked scanner that a model ran on.", labels=["scanner"])
        silent = GaugeMetricFamily(
            "dicom_node_scanner_silent",
            "1 when a tracked scanner sent no series for drift.silent_scanner_days, else 0.", labels=["scanner"])
        for s in report.scanners:
            seen.add_metric([s.label], s.last_seen)
            silent.add_metric([s.label], 1.0 if s.silent else 0.0)
        yield from (value, alert, jobs, seen, silent)
