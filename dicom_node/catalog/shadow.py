"""Shadow mode in the catalog: stored comparisons of shadow and live models, and rule modes.

A shadow job (``jobs.mode = "shadow"``) runs like a live one but is never dispatched.  When a
shadow job and a live job of the same series and generation are both ``done``, the agreement of
their predictions is computed once (``dicom_node.shadow``) and kept here as a
:class:`ShadowComparisonRow`, independent of the jobs: ``gc`` may remove the series and its
jobs, the trial's history stays.  :class:`RuleModeRow` remembers each rule's mode at the last
start of ``serve`` so that a change (promoting a shadow model: ``mode = "live"``) is recorded as
a :class:`RuleModeEventRow`, an audit trail of when a model started (or stopped) reaching the
archive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.catalog.store import Catalog
from dicom_node.catalog.tables import Base, JobRow, JobState

SHADOW = "shadow"
LIVE = "live"


class ShadowComparisonRow(Base):
    """The agreement of one shadow job with one live job on the same series."""

    __tablename__ = "shadow_comparisons"
    __table_args__ = (
        UniqueConstraint("shadow_job_id", "live_job_id", name="uq_shadow_comparison_jobs"),
        Index("ix_shadow_comparisons_models", "shadow_model", "live_model", "computed_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    #: No foreign keys: the comparison outlives the jobs (``gc``).
    shadow_job_id: Mapped[int] = mapped_column(Integer)
    live_job_id: Mapped[int] = mapped_column(Integer)
    shadow_model: Mapped[str] = mapped_column(String(128))
    live_model: Mapped[str] = mapped_column(String(128))
    computed_at: Mapped[float] = mapped_column(Float)
    #: Mean Dice over the label pairs matched by name or code, else of the overall foreground;
    #: NULL when it could not be computed (see ``status``).
    dice: Mapped[float | None] = mapped_column(Float)
    #: ``labels`` (matched label pairs), ``foreground`` (no label in common), or why there is
    #: no figure (``no prediction``, ``grid differs``).
    basis: Mapped[str] = mapped_column(String(32))
    shadow_findings: Mapped[int] = mapped_column(Integer, default=0)
    live_findings: Mapped[int] = mapped_column(Integer, default=0)
    matched_findings: Mapped[int] = mapped_column(Integer, default=0)
    #: The full figures (per-label volumes and Dice, matched findings with distances) as JSON.
    detail_json: Mapped[str] = mapped_column(Text, default="{}")

    @property
    def detail(self) -> dict[str, Any]:
        return dict(json.loads(self.detail_json))


class RuleModeRow(Base):
    """A rule's mode (and models) as ``serve`` last started with it."""

    __tablename__ = "rule_modes"

    rule: Mapped[str] = mapped_column(String(128), primary_key=True)
    mode: Mapped[str] = mapped_column(String(8))
    models: Mapped[str] = mapped_column(Text, default="")
    recorded_at: Mapped[float] = mapped_column(Float)


class RuleModeEventRow(Base):
    """A rule whose mode changed between two starts of ``serve`` (a promotion or a demotion)."""

    __tablename__ = "rule_mode_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    rule: Mapped[str] = mapped_column(String(128))
    old_mode: Mapped[str] = mapped_column(String(8))
    new_mode: Mapped[str] = mapped_column(String(8))
    models: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(Text, default="")


@dataclass(frozen=True)
class Comparison:
    """The figures to store for one (shadow job, live job) pair."""

    shadow: JobRow
    live: JobRow
    dice: float | None
    basis: str
    shadow_findings: int
    live_findings: int
    matched_findings: int
    detail: Mapping[str, Any]


def has_shadow_sibling(catalog: Catalog, job: JobRow) -> bool:
    """Whether a job of the other mode exists on ``job``'s series and generation (so the
    worker keeps ``job``'s prediction for the comparison)."""
    other = LIVE if job.mode == SHADOW else SHADOW
    with catalog.session() as s:
        return s.scalars(select(JobRow.id).where(
            JobRow.series_instance_uid == job.series_instance_uid,
            JobRow.generation == job.generation,
            JobRow.mode == other,
        ).limit(1)).first() is not None


def pairs_to_compare(catalog: Catalog, job: JobRow | None = None) -> list[tuple[JobRow, JobRow]]:
    """(shadow job, live job) pairs, both ``done``, on the same series and generation, with no
    stored comparison yet; only those involving ``job`` when it is given, else all of them."""
    done = JobState.DONE.value
    with catalog.session() as s:
        query = select(JobRow).where(JobRow.state == done, JobRow.mode == SHADOW)
        if job is not None:
            query = query.where(JobRow.series_instance_uid == job.series_instance_uid,
                                JobRow.generation == job.generation)
        shadows = list(s.scalars(query.order_by(JobRow.id)))
        # Two integer columns of every stored pair: no IN list that could pass SQLite's
        # variable limit on a long trial.
        stored = select(ShadowComparisonRow.shadow_job_id, ShadowComparisonRow.live_job_id)
        if job is not None:
            stored = stored.where(ShadowComparisonRow.series_instance_uid == job.series_instance_uid)
        known = {(int(a), int(b)) for a, b in s.execute(stored)} if shadows else set()
        pairs: list[tuple[JobRow, JobRow]] = []
        for sh in shadows:
            lives = s.scalars(select(JobRow).where(
                JobRow.series_instance_uid == sh.series_instance_uid, JobRow.generation == sh.generation,
                JobRow.state == done, JobRow.mode == LIVE).order_by(JobRow.id))
            pairs += [(sh, lv) for lv in lives if (sh.id, lv.id) not in known]
    if job is not None:
        pairs = [p for p in pairs if job.id in (p[0].id, p[1].id)]
    return pairs


def record_comparison(catalog: Catalog, c: Comparison, now: float | None = None) -> bool:
    """Store one comparison; False when it was already stored (two workers finishing the pair
    at the same moment both compute it: the unique pair keeps one)."""
    row = ShadowComparisonRow(
        series_instance_uid=c.shadow.series_instance_uid, generation=c.shadow.generation,
        shadow_job_id=c.shadow.id, live_job_id=c.live.id, shadow_model=c.shadow.model, live_model=c.live.model,
        computed_at=time.time() if now is None else now, dice=c.dice, basis=c.basis,
        shadow_findings=c.shadow_findings, live_findings=c.live_findings, matched_findings=c.matched_findings,
        detail_json=json.dumps(dict(c.detail)),
    )
    try:
        with catalog.session() as s:
            s.add(row)
    except IntegrityError:
        return False
    return True


def comparisons(catalog: Catalog, *, model: str | None = None, since: float | None = None,
                limit: int = 10000) -> list[ShadowComparisonRow]:
    """Stored comparisons, oldest first; ``model`` matches the shadow or the live model."""
    query = select(ShadowComparisonRow)
    if model is not None:
        query = query.where((ShadowComparisonRow.shadow_model == model) | (ShadowComparisonRow.live_model == model))
    if since is not None:
        query = query.where(ShadowComparisonRow.computed_at >= since)
    with catalog.session() as s:
        rows = list(s.scalars(query.order_by(ShadowComparisonRow.computed_at.desc()).limit(limit)))
    return rows[::-1]


def record_rule_modes(catalog: Catalog, rules: Iterable[tuple[str, str, Iterable[str]]], *,
                      now: float | None = None) -> list[RuleModeEventRow]:
    """Remember each rule's ``(name, mode, models)``; return an event for each rule whose mode
    differs from the one recorded before (a rule seen for the first time is recorded quietly).
    """
    at = time.time() if now is None else now
    events: list[RuleModeEventRow] = []
    with catalog.session() as s:
        for name, mode, models in rules:
            names = ",".join(models)
            row = s.get(RuleModeRow, name)
            if row is None:
                s.add(RuleModeRow(rule=name, mode=mode, models=names, recorded_at=at))
                continue
            if row.mode != mode:
                verb = "promoted to live" if mode == LIVE else f"changed to {mode}"
                event = RuleModeEventRow(at=at, rule=name, old_mode=row.mode, new_mode=mode, models=names,
                                         detail=f"rule {name} ({names}) {verb} (was {row.mode})")
                s.add(event)
                events.append(event)
            row.mode, row.models, row.recorded_at = mode, names, at
    return events


def rule_mode_events(catalog: Catalog, limit: int = 50) -> list[RuleModeEventRow]:
    """The latest rule mode changes, newest first."""
    with catalog.session() as s:
        return list(s.scalars(select(RuleModeEventRow).order_by(RuleModeEventRow.id.desc()).limit(limit)))
