"""Completion queries: series still receiving, completing one (jobs in the same transaction), and
what each sender's history says about how it sends series.

A *sender* is a calling AE title together with the first routing rule its series match ("" for
none): the same modality may push CT series whole and split its MR series.  Its history holds
its newest ``completion.history_size`` completed series; a series is *split* when an instance
of it arrived after an association that carried it was released.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from dicom_node.catalog.store import Catalog, JobSpec, add_jobs
from dicom_node.catalog.tables import SenderHistoryRow, SeriesRow, SeriesState


@dataclass(frozen=True)
class SenderStats:
    """What the history says about one sender (calling AE title, rule)."""

    calling_ae_title: str
    rule: str
    #: Series in the (bounded) history.
    series: int
    #: Of those, split over associations.
    splits: int
    #: Of those, completed at release and then continued (each one also counts as a split).
    premature: int
    #: ``association`` when at least ``learn_min_series`` series are known and none was split,
    #: else ``idle``.
    mode: str

    @property
    def split_rate(self) -> float:
        return self.splits / self.series if self.series else 0.0


def receiving_series(catalog: Catalog) -> list[SeriesRow]:
    """Every series still receiving (the completion loop decides which are complete)."""
    with catalog.session() as s:
        return list(s.scalars(select(SeriesRow).where(SeriesRow.state == SeriesState.RECEIVING.value)))


def sender_stats(catalog: Catalog, min_series: int) -> dict[tuple[str, str], SenderStats]:
    """Per (calling AE title, rule): history size, splits, premature completions and the mode."""
    with catalog.session() as s:
        rows = s.execute(
            select(SenderHistoryRow.calling_ae_title, SenderHistoryRow.rule, func.count(),
                   func.sum(SenderHistoryRow.split), func.sum(SenderHistoryRow.premature))
            .group_by(SenderHistoryRow.calling_ae_title, SenderHistoryRow.rule)
        ).all()
    out: dict[tuple[str, str], SenderStats] = {}
    for ae, rule, n, splits, premature in rows:
        splits, premature = int(splits or 0), int(premature or 0)
        mode = "association" if n >= min_series and splits == 0 else "idle"
        out[(ae, rule)] = SenderStats(ae, rule, int(n), splits, premature, mode)
    return out


def complete_series(
    catalog: Catalog, uid: str, generation: int, *, reason: str, note: str | None, specs: Sequence[JobSpec],
    rule: str, history_size: int, job_detail: str | None = None,
) -> list[int] | None:
    """Mark series ``uid`` complete, create its jobs and record it in its sender's history, in
    one transaction: a crash leaves either a receiving series or a complete one with its jobs.

    Returns the new job ids, or None when the series is no longer the receiving ``generation``
    seen by the caller (completed elsewhere, or a late instance came in between).
    """
    now = time.time()
    with catalog.session() as s:
        row = s.get(SeriesRow, uid, with_for_update=True)
        if row is None or row.state != SeriesState.RECEIVING.value or row.generation != generation:
            return None
        row.state = SeriesState.COMPLETE.value
        row.completed_at = now
        row.completion_reason = reason
        if note is not None:
            row.note = note
        ae = row.calling_ae_title or ""
        history = s.get(SenderHistoryRow, uid)
        if history is None:
            s.add(SenderHistoryRow(series_instance_uid=uid, calling_ae_title=ae, rule=rule,
                                   split=1 if row.continued else 0, premature=0,
                                   completion_reason=reason, completed_at=now))
        else:  # a later generation of the same series
            history.split = max(history.split, 1 if row.continued else 0)
            history.completion_reason = reason
            history.completed_at = now
        s.flush()
        # Bounded: keep the sender's newest ``history_size`` series.
        keep = select(SenderHistoryRow.series_instance_uid).where(
            SenderHistoryRow.calling_ae_title == ae, SenderHistoryRow.rule == rule,
        ).order_by(SenderHistoryRow.completed_at.desc()).limit(history_size)
        s.execute(delete(SenderHistoryRow).where(
            SenderHistoryRow.calling_ae_title == ae, SenderHistoryRow.rule == rule,
            SenderHistoryRow.series_instance_uid.not_in(keep),
        ))
        return add_jobs(s, specs, now, job_detail)
