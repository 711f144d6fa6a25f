"""Drift per (model, scanner): the baseline window against the recent window, and silent scanners.

Windows, over the observations of one (model, scanner) in the order they were recorded:

* **baseline**: the first ``drift.baseline_jobs`` observations, or, with ``baseline_start`` /
  ``baseline_end``, those recorded in that date range (UTC days, end excluded);
* **recent**: after the baseline, the last ``window_jobs`` observations, or with ``window_days`` > 0
  those of the last ``window_days`` days.  The two windows never share an observation.

A pair is ``collecting`` until its baseline is full (``baseline_jobs`` reached, or the date range
over) and its recent window holds ``min_window_jobs``; then each feature present in both windows
gets its PSI (:mod:`dicom_node.drift.psi`) and the pair is ``drift`` when one exceeds
``psi_alert``, else ``stable``.  A scanner is ``silent`` when its newest series is older than
``silent_scanner_days``.

:class:`DriftMonitor` caches the evaluation until a new observation arrives (the catalog's
newest id and count), and evaluates at most every 30 s, so ``/metrics`` scrapes and dashboard
refreshes of a busy node do not recompute it each time; an evaluation reads only the rows its
windows use.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.catalog import Catalog
from dicom_node.catalog import drift as store
from dicom_node.catalog.drift import Observation
from dicom_node.drift import psi
from dicom_node.drift.features import CATEGORICAL
from dicom_node.settings import DriftSettings

_DAY = 86400.0


@dataclass(frozen=True)
class FeatureDrift:
    """One feature of one pair: its PSI and both binned distributions."""

    feature: str
    kind: str
    psi: float
    bins: list[str]
    baseline: list[float]
    recent: list[float]
    baseline_n: int
    recent_n: int
    alert: bool


@dataclass(frozen=True)
class PairDrift:
    """One (model, scanner)."""

    model: str
    scanner: str
    scanner_id: int
    status: str
    baseline_n: int
    recent_n: int
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def alert(self) -> bool:
        return self.status == "drift"

    @property
    def worst(self) -> FeatureDrift | None:
        """The feature with the highest PSI (None while collecting)."""
        return max(self.features, key=lambda f: f.psi, default=None)


@dataclass(frozen=True)
class ScannerStatus:
    """A tracked scanner: who it is (no patient data) and when it last sent a series."""

    id: int
    label: str
    manufacturer: str
    model_name: str
    station: str
    protocol: str
    first_seen: float
    last_seen: float
    silent: bool


@dataclass(frozen=True)
class DriftReport:
    """The whole evaluation."""

    generated_at: float
    pairs: list[PairDrift]
    scanners: list[ScannerStatus]

    @property
    def alerts(self) -> list[PairDrift]:
        return [p for p in self.pairs if p.alert]

    @property
    def silent(self) -> list[ScannerStatus]:
        return [s for s in self.scanners if s.silent]


def _epoch(day: _dt.date) -> float:
    return _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.UTC).timestamp()


def baseline_range(settings: DriftSettings) -> tuple[float, float] | None:
    """The configured baseline date range in epoch seconds (None: the first jobs)."""
    if settings.baseline_start is None or settings.baseline_end is None:
        return None
    return _epoch(settings.baseline_start), _epoch(settings.baseline_end)


def split_windows(obs: Sequence[Observation], settings: DriftSettings,
                  now: float) -> tuple[list[Observation], list[Observation], bool]:
    """(baseline, recent, baseline complete) for the observations of one pair, oldest first."""
    dates = baseline_range(settings)
    if dates is not None:
        baseline = [o for o in obs if dates[0] <= o.at < dates[1]]
        after = [o for o in obs if o.at >= dates[1]]
        complete = now >= dates[1] and bool(baseline)
    else:
        baseline = list(obs[: settings.baseline_jobs])
        after = list(obs[settings.baseline_jobs:])
        complete = len(baseline) >= settings.baseline_jobs
    if settings.window_days > 0:
        recent = [o for o in after if o.at >= now - settings.window_days * _DAY]
    else:
        recent = after[-settings.window_jobs:]
    return baseline, recent, complete


def compare(feature: str, baseline: Sequence[Any], recent: Sequence[Any],
            settings: DriftSettings) -> FeatureDrift | None:
    """PSI of one feature over two windows (None when it cannot be compared)."""
    if not baseline or not recent:
        return None
    if feature in CATEGORICAL:
        dist = psi.categorical([str(v) for v in baseline], [str(v) for v in recent])
    else:
        b = [float(v) for v in baseline if psi.is_number(v)]
        r = [float(v) for v in recent if psi.is_number(v)]
        if not b or not r:
            return None
        dist = psi.numeric(b, r, settings.bins)
    value = round(dist.psi, 4)
    return FeatureDrift(feature, dist.kind, value, dist.bins, dist.baseline, dist.recent, len(baseline), len(recent),
                        value > settings.psi_alert)


def evaluate_pair(model: str, scanner: tuple[int, str], obs: Sequence[Observation], settings: DriftSettings,
                  now: float) -> PairDrift:
    """Baseline against recent for every feature of one (model, scanner)."""
    baseline, recent, complete = split_windows(obs, settings, now)
    if not complete or len(recent) < settings.min_window_jobs:
        return PairDrift(model, scanner[1], scanner[0], "collecting", len(baseline), len(recent))
    names = sorted({k for o in baseline for k in o.features} & {k for o in recent for k in o.features})
    features = []
    for name in names:
        found = compare(name, [o.features[name] for o in baseline if name in o.features],
                        [o.features[name] for o in recent if name in o.features], settings)
        if found is not None:
            features.append(found)
    status = "drift" if any(f.alert for f in features) else "stable"
    return PairDrift(model, scanner[1], scanner[0], status, len(baseline), len(recent), features)


def evaluate(catalog: Catalog, settings: DriftSettings, now: float | None = None) -> DriftReport:
    """The drift of every (model, scanner) and the state of every tracked scanner."""
    now = time.time() if now is None else now
    scanner_rows = store.scanners(catalog)
    labels = {r.id: r.label for r in scanner_rows}
    dates = baseline_range(settings)
    pairs = []
    for model, sid in sorted(store.pairs(catalog), key=lambda p: (p[0], labels.get(p[1], ""))):
        # Only the rows the windows can use: the baseline (first jobs or its date range) and the
        # recent window (last jobs or last days).
        obs = store.pair_observations(
            catalog, model, sid, first=0 if dates else settings.baseline_jobs,
            last=0 if settings.window_days > 0 else settings.window_jobs,
            since=now - settings.window_days * _DAY if settings.window_days > 0 else None, between=dates)
        pairs.append(evaluate_pair(model, (sid, labels.get(sid, str(sid))), obs, settings, now))
    return DriftReport(now, pairs, scanner_status(scanner_rows, settings, now))


def scanner_status(rows: Sequence[Any], settings: DriftSettings, now: float) -> list[ScannerStatus]:
    """Each scanner with its silent flag as of ``now``."""
    limit = settings.silent_scanner_days * _DAY
    return [ScannerStatus(r.id, r.label, r.manufacturer, r.model_name, r.station, r.protocol, r.first_seen,
                          r.last_seen, limit > 0 and now - r.last_seen > limit) for r in rows]


class DriftMonitor:
    """The current :class:`DriftReport`, recomputed only when observations changed."""

    def __init__(self, catalog: Catalog, settings: DriftSettings, *, min_interval_s: float = 30.0) -> None:
        self.catalog = catalog
        self.settings = settings
        #: A new evaluation at most this often (scrapes of a busy node come every few seconds,
        #: each after new jobs: drift is a matter of days, not seconds).
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._version: tuple[int, int] | None = None
        self._pairs: list[PairDrift] = []
        self._computed_at = 0.0

    def report(self, now: float | None = None) -> DriftReport:
        """Pairs from the cache while no observation was added or for ``min_interval_s`` after
        the last evaluation (and for at most an hour, so a ``window_days`` window still slides);
        scanners' silence always as of ``now``."""
        now = time.time() if now is None else now
        with self._lock:
            version = store.observation_version(self.catalog)
            age = now - self._computed_at
            changed = version != self._version and (self._version is None or age >= self.min_interval_s)
            if changed or age > 3600 or age < 0:
                report = evaluate(self.catalog, self.settings, now)
                self._version, self._pairs, self._computed_at = version, report.pairs, now
                return report
            pairs = self._pairs
        return DriftReport(now, pairs, scanner_status(store.scanners(self.catalog), self.settings, now))
