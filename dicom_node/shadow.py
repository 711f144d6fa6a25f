"""Shadow mode: compare shadow models with the live models that ran on the same series.

A rule with ``mode = "shadow"`` creates shadow jobs (``dicom_node.catalog.shadow``): they run
and encode like live jobs, their results stay in the outbox, and they end ``done`` without a
dispatch.  When a shadow job and a live job of the same series and generation are both done,
:func:`compare_job` (called by the worker that finished the second of them) reads the two
saved predictions (``prediction.npz``, see :mod:`dicom_node.results.agreement` for why that
file and not the SEG) and stores their agreement in the catalog.  Two workers finishing a pair
at the same moment both see it done after their own commit, so at least one compares it, and
the pair's unique key keeps one row.  ``dicom-node shadow report`` also compares any pair left
over (a worker that died in between), so the report never misses a finished pair.

:func:`build_report` groups the stored comparisons by (shadow model, live model) for the CLI,
``/api/shadow`` and the dashboard panel.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from dicom_node.catalog import Catalog, JobRow
from dicom_node.catalog import shadow as store
from dicom_node.settings import RuleSettings

log = structlog.get_logger(__name__)

__all__ = ["build_report", "compare_job", "compare_pending", "format_report", "prediction_path", "record_rule_modes"]


def prediction_path(outbox: Path, job: JobRow) -> Path:
    """Where the worker saved ``job``'s prediction (``results["prediction"]``, else the default)."""
    from dicom_node.results.agreement import PREDICTION_FILE

    saved = job.results.get("prediction")
    return Path(saved) if saved else outbox / f"job-{job.id}" / PREDICTION_FILE


def _compare_pair(outbox: Path, shadow: JobRow, live: JobRow) -> store.Comparison:
    from dicom_node.results.agreement import compare, read_prediction

    try:
        s_pred = read_prediction(prediction_path(outbox, shadow))
        l_pred = read_prediction(prediction_path(outbox, live))
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        # Gone (gc) or never written (a job encoded before shadow mode existed): say so.
        return store.Comparison(shadow, live, None, "no prediction", 0, 0, 0, {"why": type(exc).__name__})
    a = compare(s_pred, l_pred)
    return store.Comparison(shadow, live, a.dice, a.basis, a.shadow_findings, a.live_findings,
                            a.matched_findings, a.detail)


def _compare(catalog: Catalog, outbox: Path, pairs: Iterable[tuple[JobRow, JobRow]]) -> int:
    stored = 0
    for shadow, live in pairs:
        c = _compare_pair(outbox, shadow, live)
        if store.record_comparison(catalog, c):
            stored += 1
            log.info("shadow_compared", shadow_job_id=shadow.id, live_job_id=live.id, shadow_model=shadow.model,
                     live_model=live.model, dice=c.dice, basis=c.basis, shadow_findings=c.shadow_findings,
                     live_findings=c.live_findings, matched_findings=c.matched_findings)
    return stored


def compare_job(catalog: Catalog, outbox: Path, job: JobRow) -> int:
    """Compare ``job`` (just done) with every done job of the other mode on its series and
    generation not compared yet; returns how many comparisons were stored."""
    return _compare(catalog, outbox, store.pairs_to_compare(catalog, job))


def compare_pending(catalog: Catalog, outbox: Path) -> int:
    """Compare every finished (shadow, live) pair that has no stored comparison yet."""
    return _compare(catalog, outbox, store.pairs_to_compare(catalog))


def record_rule_modes(catalog: Catalog, rules: Iterable[RuleSettings]) -> list[str]:
    """Remember each rule's mode; log (and return) one line per rule whose mode changed since the
    last start, e.g. ``rule chest-v2 (ct-v2) promoted to live (was shadow)``."""
    events = store.record_rule_modes(catalog, [(r.name, r.mode, r.models) for r in rules])
    for e in events:
        log.warning("rule_mode_changed", rule=e.rule, old_mode=e.old_mode, new_mode=e.new_mode, models=e.models)
    return [e.detail for e in events]


def _finding_agreement(shadow: int, live: int, matched: int) -> float:
    """2·matched / (shadow + live) findings (an F1 score); 1.0 when neither found anything."""
    total = shadow + live
    return 1.0 if total == 0 else 2.0 * matched / total


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def build_report(catalog: Catalog, *, model: str | None = None, since: float | None = None,
                 series_limit: int = 200) -> dict[str, Any]:
    """The stored comparisons per (shadow model, live model): series count, mean Dice, finding
    agreement, mean volumes per label, and the per-series rows (newest first); plus the rule
    mode changes."""
    rows = store.comparisons(catalog, model=model, since=since)
    groups: dict[tuple[str, str], list[store.ShadowComparisonRow]] = {}
    for r in rows:
        groups.setdefault((r.shadow_model, r.live_model), []).append(r)
    pairs = []
    for (s_model, l_model), items in sorted(groups.items()):
        s_f, l_f, m_f = (sum(r.shadow_findings for r in items), sum(r.live_findings for r in items),
                         sum(r.matched_findings for r in items))
        volumes: dict[str, dict[str, list[float]]] = {"shadow": {}, "live": {}}
        for r in items:
            for side in ("shadow", "live"):
                for label, ml in r.detail.get("volumes_ml", {}).get(side, {}).items():
                    volumes[side].setdefault(label, []).append(float(ml))
        pairs.append({
            "shadow_model": s_model, "live_model": l_model, "series": len({r.series_instance_uid for r in items}),
            "comparisons": len(items),
            "mean_dice": _mean([r.dice for r in items if r.dice is not None]),
            "shadow_findings": s_f, "live_findings": l_f, "matched_findings": m_f,
            "finding_agreement": round(_finding_agreement(s_f, l_f, m_f), 4),
            "mean_volumes_ml": {side: {k: _mean(v) for k, v in vols.items()} for side, vols in volumes.items()},
            "series_list": [_series_row(r) for r in reversed(items)][:series_limit],
        })
    events = [{"at": e.at, "rule": e.rule, "old_mode": e.old_mode, "new_mode": e.new_mode, "models": e.models,
               "detail": e.detail} for e in store.rule_mode_events(catalog)]
    return {"pairs": pairs, "events": events, "generated_at": time.time()}


def _series_row(r: store.ShadowComparisonRow) -> dict[str, Any]:
    d = r.detail
    return {"series_instance_uid": r.series_instance_uid, "generation": r.generation,
            "shadow_job_id": r.shadow_job_id, "live_job_id": r.live_job_id, "computed_at": r.computed_at,
            "dice": r.dice, "basis": r.basis, "dice_per_label": d.get("dice_per_label", {}),
            "volumes_ml": d.get("volumes_ml", {}), "shadow_findings": r.shadow_findings,
            "live_findings": r.live_findings, "matched_findings": r.matched_findings}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + "Z"


def format_report(report: dict[str, Any], *, series: bool = True) -> str:
    """The report as the readable tables of ``dicom-node shadow report``."""
    lines: list[str] = []
    if not report["pairs"]:
        lines.append("no shadow comparison yet (a shadow job and a live job must both be done on a series)")
    for p in report["pairs"]:
        lines.append(f"shadow {p['shadow_model']}  vs  live {p['live_model']}")
        lines.append(f"  series {p['series']}   mean Dice {_fmt(p['mean_dice'])}   findings shadow "
                     f"{p['shadow_findings']} / live {p['live_findings']} / matched {p['matched_findings']}   "
                     f"finding agreement {_fmt(p['finding_agreement'])}")
        for side in ("shadow", "live"):
            vols = p["mean_volumes_ml"][side]
            if vols:
                shown = ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in vols.items())
                lines.append(f"  mean volume ({side}, ml): {shown}")
        if series and p["series_list"]:
            lines.append(f"  {'series':<64} {'gen':>3} {'jobs':>11} {'Dice':>6} {'basis':<11} "
                         f"{'find s/l/m':>10}  per label")
            for r in p["series_list"]:
                labels = ", ".join(f"{k} {v:.3f}" for k, v in r["dice_per_label"].items())
                jobs = f"{r['shadow_job_id']}/{r['live_job_id']}"
                finds = f"{r['shadow_findings']}/{r['live_findings']}/{r['matched_findings']}"
                lines.append(f"  {r['series_instance_uid']:<64} {r['generation']:>3} {jobs:>11} "
                             f"{_fmt(r['dice']):>6} {r['basis']:<11} {finds:>10}  {labels}")
        lines.append("")
    if report["events"]:
        lines.append("rule mode changes (newest first):")
        lines += [f"  {_when(e['at'])}  {e['detail']}" for e in report["events"]]
    return "\n".join(lines).rstrip() + "\n"
