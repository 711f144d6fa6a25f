"""The drift monitor's SQL: tracked scanners and per-job observations (``dicom_node.drift``).

A scanner is a normalised (Manufacturer, ManufacturerModelName, StationName, protocol) made by
``dicom_node.drift.scanners``; at most ``max_scanners`` get their own row, every later one is
folded into the single ``other`` row, so Prometheus label values stay bounded however many
modalities a site has.  An observation is one job's input and output features as JSON, one per
(model, series): a re-run of the same series replaces it instead of counting twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.catalog.store import Catalog
from dicom_node.catalog.tables import DriftObservationRow, DriftScannerRow

#: Key and label of the row that takes every scanner past ``max_scanners``.
OTHER = "other"


@dataclass(frozen=True)
class ScannerIdentity:
    """A normalised scanner as the drift package builds it (no patient data)."""

    key: str
    label: str
    manufacturer: str = ""
    model_name: str = ""
    station: str = ""
    protocol: str = ""


@dataclass(frozen=True)
class Observation:
    """One stored observation, detached from the session."""

    id: int
    model: str
    scanner_id: int
    at: float
    features: dict[str, Any]


def _scanner_row(s: Session, scanner: ScannerIdentity, max_scanners: int, now: float) -> DriftScannerRow:
    row = s.scalars(select(DriftScannerRow).where(DriftScannerRow.key == scanner.key)).first()
    if row is not None:
        return row
    tracked = s.scalar(select(func.count()).select_from(DriftScannerRow).where(DriftScannerRow.key != OTHER)) or 0
    if tracked >= max_scanners:
        row = s.scalars(select(DriftScannerRow).where(DriftScannerRow.key == OTHER)).first()
        if row is not None:
            return row
        scanner = ScannerIdentity(OTHER, OTHER)
    label = scanner.label
    if s.scalar(select(func.count()).select_from(DriftScannerRow).where(DriftScannerRow.label == label)):
        # Two identities with the same short label (same station name, same 6 hex digits): the
        # metrics need distinct label values, so this one gets more of its key.
        label = f"{label}{scanner.key[6:12]}"
    row = DriftScannerRow(key=scanner.key, label=label, manufacturer=scanner.manufacturer[:64],
                          model_name=scanner.model_name[:64], station=scanner.station[:16],
                          protocol=scanner.protocol[:64], first_seen=now, last_seen=now)
    s.add(row)
    s.flush()
    return row


def record_observation(
    catalog: Catalog, *, model: str, series_instance_uid: str, job_id: int | None, at: float, seen_at: float,
    scanner: ScannerIdentity, features: Mapping[str, Any], max_scanners: int,
) -> str:
    """Store one job's features under its (model, scanner); return the scanner label used.

    ``seen_at`` (the series' last instance) moves the scanner's ``last_seen`` forward.  Two
    workers adding the same new scanner at once: the loser of the unique key retries once.
    """
    for attempt in (1, 2):
        try:
            with catalog.session() as s:
                row = _scanner_row(s, scanner, max_scanners, seen_at)
                row.last_seen = max(row.last_seen, seen_at)
                obs = s.scalars(select(DriftObservationRow).where(
                    DriftObservationRow.model == model,
                    DriftObservationRow.series_instance_uid == series_instance_uid)).first()
                if obs is None:
                    obs = DriftObservationRow(model=model, series_instance_uid=series_instance_uid)
                    s.add(obs)
                obs.scanner_id = row.id
                obs.job_id = job_id
                obs.at = at
                obs.features_json = json.dumps(dict(features), sort_keys=True)
                return row.label
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def scanners(catalog: Catalog) -> list[DriftScannerRow]:
    """Every tracked scanner (and ``other``), by id."""
    with catalog.session() as s:
        return list(s.scalars(select(DriftScannerRow).order_by(DriftScannerRow.id)))


def observations(catalog: Catalog) -> list[Observation]:
    """Every stored observation, oldest first (bounded by ``drift.retention_days``)."""
    with catalog.session() as s:
        rows = s.execute(select(DriftObservationRow.id, DriftObservationRow.model, DriftObservationRow.scanner_id,
                                DriftObservationRow.at, DriftObservationRow.features_json)
                         .order_by(DriftObservationRow.id))
        return [Observation(i, m, sc, at, json.loads(f)) for i, m, sc, at, f in rows]


def pairs(catalog: Catalog) -> list[tuple[str, int]]:
    """Every (model, scanner id) with observations."""
    with catalog.session() as s:
        rows = s.execute(select(DriftObservationRow.model, DriftObservationRow.scanner_id).distinct())
        return [(m, int(sid)) for m, sid in rows]


def pair_observations(catalog: Catalog, model: str, scanner_id: int, *, first: int = 0, last: int = 0,
                      since: float | None = None, between: tuple[float, float] | None = None) -> list[Observation]:
    """The observations of one (model, scanner) that its windows can use, oldest first: its
    ``first`` oldest, its ``last`` newest, those at or after ``since``, those inside ``between``
    (all, when none of these is given).  Only these rows are read and parsed, so an evaluation
    costs the windows' size, not the whole retained history."""
    cols = (DriftObservationRow.id, DriftObservationRow.model, DriftObservationRow.scanner_id,
            DriftObservationRow.at, DriftObservationRow.features_json)
    pair = (DriftObservationRow.model == model, DriftObservationRow.scanner_id == scanner_id)
    queries = []
    if first:
        queries.append(select(*cols).where(*pair).order_by(DriftObservationRow.id).limit(first))
    if last:
        queries.append(select(*cols).where(*pair).order_by(DriftObservationRow.id.desc()).limit(last))
    if since is not None:
        queries.append(select(*cols).where(*pair, DriftObservationRow.at >= since))
    if between is not None:
        queries.append(select(*cols).where(*pair, DriftObservationRow.at >= between[0],
                                           DriftObservationRow.at < between[1]))
    if not queries:
        queries.append(select(*cols).where(*pair))
    found: dict[int, Observation] = {}
    with catalog.session() as s:
        for q in queries:
            for i, m, sc, at, f in s.execute(q):
                if i not in found:
                    found[i] = Observation(i, m, sc, at, json.loads(f))
    return [found[i] for i in sorted(found)]


def observation_version(catalog: Catalog) -> tuple[int, int]:
    """(newest id, count) of the observations: a cached evaluation is current while it is equal."""
    with catalog.session() as s:
        newest, count = s.execute(select(func.max(DriftObservationRow.id), func.count())
                                  .select_from(DriftObservationRow)).one()
        return int(newest or 0), int(count or 0)


def prune_observations(catalog: Catalog, *, cutoff: float, keep_first: int,
                       keep_between: tuple[float, float] | None = None) -> int:
    """Delete observations older than ``cutoff`` except each (model, scanner)'s first
    ``keep_first`` (the job-count baseline) and those inside ``keep_between`` (a date-range
    baseline); return how many were removed."""
    removed = 0
    with catalog.session() as s:
        pairs = s.execute(select(DriftObservationRow.model, DriftObservationRow.scanner_id).distinct()).all()
        for model, scanner_id in pairs:
            pair = (DriftObservationRow.model == model, DriftObservationRow.scanner_id == scanner_id)
            boundary = s.scalar(select(DriftObservationRow.id).where(*pair).order_by(DriftObservationRow.id)
                                .offset(max(keep_first - 1, 0)).limit(1)) if keep_first > 0 else 0
            if boundary is None:
                continue  # fewer rows than the baseline: all kept
            q = delete(DriftObservationRow).where(*pair, DriftObservationRow.at < cutoff,
                                                  DriftObservationRow.id > boundary)
            if keep_between is not None:
                q = q.where((DriftObservationRow.at < keep_between[0]) | (DriftObservationRow.at >= keep_between[1]))
            result: CursorResult[Any] = s.execute(q)  # type: ignore[assignment]
            removed += result.rowcount or 0
    return removed

