"""Operator actions on jobs and series: retry, resend, rerun, reprocess (CLI, API, dashboard).

Each action is audited: the job events it writes name the action and where it came from
(``by`` is e.g. ``"cli"`` or ``"web API"``).  The table of what ``retry`` does per job state is
in docs/operations.md; in short:

- ``retry JOB`` finishes what the job was doing (inference or delivery) in the same generation;
- ``resend JOB|SERIES`` delivers the stored results again (no model run);
- ``rerun SERIES`` runs the series' models again as a new generation;
- ``reprocess STUDY|SERIES`` re-evaluates the routing rules, then runs what matches as a new
  generation (a rule added later applies).

Result UIDs derive from (source series, model, model version, output type), never from the
generation: a new generation's objects replace the earlier ones in an archive that accepts a
re-sent SOP Instance UID (see docs/admin-guide.md, "Archive settings for corrected re-runs").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dicom_node.catalog import Catalog, CatalogError, JobRow, JobSpec, JobState, SeriesRow, SeriesState, queries
from dicom_node.scheduling.jobs import JobQueue, queue_job
from dicom_node.scheduling.routing import evaluate
from dicom_node.settings import Settings

log = structlog.get_logger(__name__)


@dataclass
class ActionReport:
    """What an operator action did: the jobs it touched or created, and one sentence per step."""

    job_ids: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def _results_on_disk(job: JobRow) -> bool:
    files = job.results.get("files", [])
    return bool(files) and all(Path(f).exists() for f in files)


def retry_job(catalog: Catalog, queue: JobQueue, job_id: int, *, reason: str) -> str:
    """Retry one job according to its state; return what was done (a sentence).

    ===================  =======================================================================
    state                retry does
    ===================  =======================================================================
    failed, results      deliver the stored results to the destinations not yet done
    failed, no results   run the model again (same generation), then deliver to every destination
    cancelled            run the model again (same generation), then deliver to every destination
    done                 deliver the stored results again to every destination (= ``resend``);
                         if they are gone from the outbox, run the model again
    received, queued     send the job to the inference queue again (a lost message)
    encoded, delivering  send the job to the dispatch queue again
    running              refused: a worker runs it (cancel it first)
    ===================  =======================================================================
    """
    job = catalog.get_job(job_id)
    if job is None:
        raise CatalogError(f"unknown job {job_id}")
    state = JobState(job.state)
    if state == JobState.RUNNING:
        raise CatalogError(f"job {job_id} is running on a worker; cancel it first to run it again")
    if state == JobState.DONE and _results_on_disk(job):
        catalog.reopen_deliveries(job_id, None, reason=f"{reason}: results sent again")
        queue.enqueue_dispatch(job_id)
        return f"job {job_id}: stored results sent again to {', '.join(job.destinations) or 'no destination'}"
    # An operator's retry starts the attempt counts again (never the automatic sweeps): a job
    # failed at [worker] or [delivery] max_attempts really runs again.
    if state in (JobState.ENCODED, JobState.DELIVERING):
        catalog.transition(job_id, JobState.ENCODED, reason=reason)
        catalog.reset_deliveries(job_id, reset_attempts=True)
        queue.enqueue_dispatch(job_id)
        return f"job {job_id} sent to the dispatch queue again"
    if state == JobState.FAILED and job.results and job.encoded_at:
        queue_job(catalog, queue, job_id, reason=reason, reset_attempts=True)  # deliveries not done
        return f"job {job_id}: delivery retried"
    # failed in inference, cancelled, done without results on disk, received, queued: run it.
    catalog.reset_deliveries(job_id, include_done=state in (JobState.DONE, JobState.CANCELLED), reset_attempts=True)
    catalog.transition(job_id, JobState.QUEUED, reason=reason, reset_attempts=True)
    queue.enqueue_inference(job_id, job.priority)
    return f"job {job_id} sent to the inference queue"


def jobs_with_results(catalog: Catalog, series_instance_uid: str) -> list[JobRow]:
    """The finished jobs of the series' newest generation that have encoded results."""
    jobs = queries.jobs_of_series(catalog, series_instance_uid)
    if not jobs:
        return []
    newest = max(j.generation for j in jobs if j.results.get("files")) if any(
        j.results.get("files") for j in jobs) else 0
    return [j for j in jobs if j.generation == newest and j.results.get("files")
            and j.state in (JobState.DONE.value, JobState.FAILED.value) and j.encoded_at]


def resend(catalog: Catalog, queue: JobQueue, settings: Settings, target: str, *,
           to: Sequence[str] = (), by: str) -> ActionReport:
    """Deliver the stored results of a job (``target`` a job id) or of a series' newest
    generation (``target`` a Series Instance UID) again, to ``to`` or to the job's destinations.

    The model does not run.  The objects are the same files with the same UIDs.
    """
    for name in to:
        settings.destination(name)  # KeyError for an unknown destination: the caller explains
    if target.isdigit():
        job = catalog.get_job(int(target))
        if job is None:
            raise CatalogError(f"unknown job {target}")
        if job.shadow:
            raise CatalogError(f"job {job.id} is a shadow job: its results are kept in the node and never "
                               "sent (promote its rule with mode = \"live\" and rerun the series)")
        jobs = [job]
    else:
        if catalog.get_series(target) is None:
            raise CatalogError(f"unknown series {target}")
        # Shadow jobs' results are never sent, not even by an operator.
        jobs = [j for j in jobs_with_results(catalog, target) if not j.shadow]
        if not jobs:
            raise CatalogError(f"series {target} has no finished job with stored results "
                               "(use 'dicom-node rerun' to run its models again)")
    report = ActionReport()
    for job in jobs:
        if job.state in (JobState.DONE.value, JobState.FAILED.value) and job.results.get("files") \
                and not _results_on_disk(job):
            raise CatalogError(f"the results of job {job.id} are gone from the outbox "
                               "(removed by gc?); use 'dicom-node rerun' to run the model again")
        where = ", ".join(to) if to else ", ".join(job.destinations) or "no destination"
        catalog.reopen_deliveries(job.id, list(to) or None, reason=f"resend by operator ({by}) to {where}")
        queue.enqueue_dispatch(job.id)
        report.job_ids.append(job.id)
        report.lines.append(f"job {job.id} ({job.model}): stored results queued for delivery to {where}")
        log.info("results_resend_requested", job_id=job.id, destinations=where, by=by)
    return report


def _previous_specs(catalog: Catalog, series: SeriesRow) -> dict[str, JobSpec]:
    """The (rule, destinations, priority) each model last ran with on ``series``, by model."""
    specs: dict[str, JobSpec] = {}
    for job in queries.jobs_of_series(catalog, series.series_instance_uid):  # oldest first: newest wins
        specs[job.model] = JobSpec(series.series_instance_uid, job.rule, job.model, job.destinations, job.priority,
                                   job.mode)
    return specs


def _matching_specs(settings: Settings, series: SeriesRow) -> tuple[list[JobSpec], list[str]]:
    """Jobs the routing rules give ``series`` now, and one reason line per rule."""
    specs, reasons = [], []
    for rule in settings.rules:
        result = evaluate(rule, series.routing_attributes())
        reasons.append(f"{'MATCH' if result.matched else 'no'} {rule.name}: {'; '.join(result.reasons)}")
        if result.matched:
            specs += [JobSpec(series.series_instance_uid, rule.name, model, rule.destinations,
                              rule.priority.value, rule.mode) for model in rule.models]
    return specs, reasons


def _start(catalog: Catalog, queue: JobQueue, series: SeriesRow, specs: list[JobSpec], detail: str,
           report: ActionReport) -> None:
    ids = catalog.new_generation(series.series_instance_uid, specs, detail=detail)
    for job_id in ids:
        queue_job(catalog, queue, job_id, reason=detail)
    after = catalog.get_series(series.series_instance_uid)
    generation = after.generation if after else "?"
    report.job_ids += ids
    report.lines.append(f"series {series.series_instance_uid}: generation {generation}, "
                        f"job(s) {', '.join(map(str, ids))} queued ({', '.join(s.model for s in specs)})")
    log.info("series_rerun_requested", series_instance_uid=series.series_instance_uid, generation=generation,
             job_ids=ids, detail=detail)


def rerun(catalog: Catalog, queue: JobQueue, settings: Settings, series_uid: str, *,
          model: str | None = None, by: str) -> ActionReport:
    """Run the models that ran on a processed series again (or only ``model``), as a new generation."""
    series = catalog.get_series(series_uid)
    if series is None:
        raise CatalogError(f"unknown series {series_uid}")
    previous = _previous_specs(catalog, series)
    # Destinations and priority come from the rules as configured now when one of them still
    # routes the model to this series; else from the model's last job (a one-off
    # ``resend --to`` is not carried over: it is in the job's events, not in a rule).
    matching, _ = _matching_specs(settings, series)
    for spec in matching:
        if spec.model in previous:
            previous[spec.model] = spec
    if model is None:
        specs = list(previous.values())
        if not specs:
            raise CatalogError(f"no model ran on series {series_uid}; 'dicom-node reprocess' applies "
                               "the routing rules, or name one with --model")
    elif model in previous:
        specs = [previous[model]]
    else:
        named = [s for s in matching if s.model == model] or [
            JobSpec(series_uid, rule.name, model, rule.destinations, rule.priority.value, rule.mode)
            for rule in settings.rules if model in rule.models][:1]
        if not named:
            raise CatalogError(f"no job and no routing rule names model {model!r}: its destinations are unknown")
        specs = named[:1]
    report = ActionReport()
    _start(catalog, queue, series, specs, f"rerun by operator ({by})", report)
    return report


def reprocess(catalog: Catalog, queue: JobQueue, settings: Settings, uid: str, *, by: str) -> ActionReport:
    """Re-evaluate the routing rules on a stored series (or every series of a study) and run what
    matches as a new generation; a series no rule matches is reported with the rules' reasons."""
    series = catalog.get_series(uid)
    targets = [series] if series is not None else catalog.series_of_study(uid)
    if not targets:
        raise CatalogError(f"no stored series or study with UID {uid}")
    report = ActionReport()
    for row in targets:
        if row.state != SeriesState.COMPLETE.value:
            report.lines.append(f"series {row.series_instance_uid}: still receiving, it is routed when complete")
            continue
        specs, reasons = _matching_specs(settings, row)
        if not specs:
            why = " | ".join(reasons) if reasons else "no routing rule is configured"
            report.lines.append(f"series {row.series_instance_uid}: no routing rule matched ({why})")
            continue
        _start(catalog, queue, row, specs, f"reprocess by operator ({by}): rules re-evaluated", report)
    return report
