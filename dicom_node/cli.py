"""dicom-node: a DICOM-native AI inference node.

PACS and modalities send studies to it over DICOM C-STORE; it runs the models that the routing
rules pick and sends the results (DICOM SEG and SR) to the archive.

Every command reads one configuration file (--config, default config/dicom-node.toml).
Exit status: 0 success, 1 the operation failed (a peer did not answer, a job could not be
retried), 2 a usage or configuration error (printed in one line naming the key or variable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dicom_node
from dicom_node.errors import ConfigError, DicomNodeError, PermanentError
from dicom_node.settings import DestinationSettings, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


class UsageError(DicomNodeError):
    """A wrong argument (an unknown destination, a missing folder): exit status 2."""


def _destination(settings: Settings, name: str) -> DestinationSettings:
    try:
        return settings.destination(name)
    except KeyError:
        known = ", ".join(d.name for d in settings.destinations) or "none"
        raise UsageError(f"no destination named {name!r}; configured destinations: {known}") from None


def _model_problems(settings: Settings) -> tuple[list[str], list[str]]:
    """Errors (a rule naming an unknown model, or sending only modalities its model refuses) and
    warnings (a rule that may send a modality its model refuses) of the rules' models."""
    try:
        from inference.introspect import accepted_modalities
        from inference.user_models import CardError
    except ImportError:
        return [], ["models not checked: torch is not installed on this host (the workers check them)"]
    paths = {spec.name: spec.path for spec in settings.models if spec.path is not None}
    framework = {spec.name: (spec.kind, spec.source) for spec in settings.models if spec.path is None}
    try:
        modalities = accepted_modalities(paths, framework)
    except CardError as exc:
        return [f"a model card: {exc}"], []
    errors, warnings = [], []
    for rule in settings.rules:
        wanted = rule.match.get("Modality")
        sent = ({str(w).strip().upper() for w in wanted} if isinstance(wanted, list)
                else {str(wanted).strip().upper()} if isinstance(wanted, str) and not wanted.startswith("/") else None)
        for model in rule.models:
            if model not in modalities:
                errors.append(f"rule {rule.name!r} names unknown model {model!r}; known models: "
                              f"{', '.join(sorted(modalities))}")
                continue
            accepted = modalities[model]
            if not accepted:
                continue
            if sent is not None and not sent & accepted:
                errors.append(f"rule {rule.name!r} sends Modality {', '.join(sorted(sent))} to {model!r}, "
                              f"which accepts only {', '.join(sorted(accepted))}")
            elif sent is None or sent - accepted:
                others = "any modality" if sent is None else ", ".join(sorted(sent - accepted))
                warnings.append(f"rule {rule.name!r} may send {others} to {model!r}, which accepts only "
                                f"{', '.join(sorted(accepted))}: such series are refused")
    return errors, warnings


def _output_warnings(settings: Settings) -> list[str]:
    """Output lists that are valid but probably not what the admin meant."""
    return [f"destination {dest.name!r} lists seg-resampled without seg: it gets no SEG for "
            "untilted series (seg-resampled is made only for gantry-tilted stacks)"
            for dest in settings.destinations if "seg-resampled" in dest.outputs and "seg" not in dest.outputs]


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.logs import configure_logging
    from dicom_node.node import Node
    from workers.app import CeleryJobQueue, create_celery_app

    settings = _settings(args)
    configure_logging(args.log_format)
    from dicom_node.ingest.listener import raise_fd_limit
    from workers.heartbeat import broker_check

    raise_fd_limit(settings.listener)  # before anything opens descriptors

    app = create_celery_app(settings)
    node = Node(settings, CeleryJobQueue(app), config_path=Path(args.config) if args.config else None,
                broker_check=broker_check(app))
    node.serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.logs import configure_logging
    from workers.app import create_celery_app
    from workers.names import DISPATCH_QUEUE, INFERENCE_QUEUE

    settings = _settings(args)
    configure_logging(args.log_format)
    app = create_celery_app(settings, with_tasks=True)
    queues = args.queues or f"{INFERENCE_QUEUE},{DISPATCH_QUEUE}"
    # Celery's ASCII-art banner is for a developer's terminal; an operator's log gets the node's
    # own worker_ready line (``--banner`` shows it again).
    argv = [] if args.banner else ["--quiet"]
    argv += ["worker", "-Q", queues, "--concurrency", str(args.concurrency or settings.worker.concurrency),
            "--prefetch-multiplier", "1", "--loglevel", "INFO", "-E", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = settings.model_dump(mode="json")
    errors, warnings = _model_problems(settings)
    warnings += _output_warnings(settings)
    warnings += [f"rule {r.name!r} is mode = \"shadow\": its destinations {r.destinations} are ignored "
                 "(results stay in the node)" for r in settings.rules if r.mode == "shadow" and r.destinations]
    unreachable: list[str] = []
    if args.probe:
        from dicom_node.delivery import reachable

        for dest in settings.destinations:
            ok, why = reachable(dest, calling_ae_title=dest.calling_ae_title or settings.listener.ae_title, timeout=10)
            if not ok:
                unreachable.append(f"destination {dest.name!r} ({dest.address}) {why}")
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if errors or unreachable:
        for line in errors + unreachable:
            print(f"error: {line}", file=sys.stderr)
        return 2 if errors else 1
    summary = (f"configuration OK: AE {settings.listener.ae_title} on {settings.listener.host}:"
               f"{settings.listener.port}, {len(settings.rules)} rule(s)"
               + (f" ({n} shadow)" if (n := sum(r.mode == "shadow" for r in settings.rules)) else "") + ", "
               f"{len(settings.destinations)} destination(s), broker {settings.broker.url.split('://')[0]}"
               + (", every destination answers" if args.probe else ""))
    _print(args, {**data, "warnings": warnings}, summary)
    return 0


def _study_date(da: str | None) -> str:
    """A DA (``20261206``) as ``2026-12-06``; empty when unknown."""
    return f"{da[:4]}-{da[4:6]}-{da[6:]}" if da else ""


def _waiting(job: Any) -> bool:
    """The job's deliveries may be waiting for a retry (``next_attempt_at`` means something)."""
    return job.state in ("encoded", "delivering")


def _job_dict(job: Any, deliveries: Sequence[Any] = (), series: Any = None) -> dict[str, Any]:
    return {
        "id": job.id, "state": job.state, "state_label": job.state_label, "mode": job.mode,
        "model": job.model, "rule": job.rule,
        "series_instance_uid": job.series_instance_uid, "study_instance_uid": job.study_instance_uid,
        "modality": job.modality, "study_date": series.study_date if series is not None else None,
        "priority": job.priority, "attempts": job.attempts,
        "reason": job.reason, "created_at": job.created_at, "updated_at": job.updated_at,
        "destinations": job.destinations, "results": job.results,
        "deliveries": [
            {"destination": d.destination, "state": d.state, "attempts": d.attempts,
             "last_error": d.last_error, "done_at": d.done_at, "confirmation": d.confirmation,
             "next_attempt_at": d.next_attempt_at if _waiting(job) else None, "objects": d.objects}
            for d in deliveries
        ],
    }


def _series_dict(row: Any, routing: list[str] | None) -> dict[str, Any]:
    return {
        "series_instance_uid": row.series_instance_uid, "study_instance_uid": row.study_instance_uid,
        "modality": row.modality, "series_description": row.series_description,
        "calling_ae_title": row.calling_ae_title, "study_date": row.study_date,
        "instances": row.instance_count, "state": row.state,
        "generation": row.generation, "last_received_at": row.last_received_at, "note": row.note,
        "routing": routing,
    }


def cmd_series(args: argparse.Namespace) -> int:
    """Series the node stores; --unmatched: those no routing rule matched, with the deciding keys."""
    from dicom_node.catalog import Catalog, queries
    from dicom_node.scheduling.routing import deciding_reasons

    settings = _settings(args)
    catalog = Catalog(settings.database.url)
    if args.unmatched:
        total, rows = queries.unmatched_series(catalog, limit=args.limit)
    else:
        rows = catalog.list_series(limit=args.limit)
        total = len(rows)
    unmatched = {r.series_instance_uid for r in queries.unmatched_series(catalog, limit=args.limit)[1]} \
        if not args.unmatched else {r.series_instance_uid for r in rows}
    data = [_series_dict(r, deciding_reasons(settings.rules, r.routing_attributes())
                         if r.series_instance_uid in unmatched else None) for r in rows]
    lines = []
    for r, d in zip(rows, data, strict=True):
        desc = " ".join(x for x in (r.modality, r.series_description and repr(r.series_description),
                                    f"from {r.calling_ae_title}" if r.calling_ae_title else None,
                                    f"study {_study_date(r.study_date)}" if r.study_date else None) if x)
        lines.append(f"{r.series_instance_uid}  {r.state:<9} {r.instance_count:>5} inst  gen {r.generation}  {desc}")
        for why in d["routing"] or []:
            lines.append(f"    no rule: {why}")
    if args.unmatched and total > len(rows):
        lines.append(f"... and {total - len(rows)} more")
    empty = "no series matched no rule" if args.unmatched else "no series"
    _print(args, data, "\n".join(lines) if lines else empty)
    return 0


def _delivery_line(d: Any, waiting: bool = False) -> str:
    """``archive: done, 1 sent, 1 refused (refused: Segmentation Storage not accepted)``."""
    counts: dict[str, int] = {}
    for o in d.objects:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    details = sorted({o["detail"] for o in d.objects if o["outcome"] in ("refused", "unconfirmed") and o["detail"]})
    text = f"{d.destination}: {d.state}" + (f" ({d.confirmation})" if d.confirmation else "")
    if counts:
        text += ", " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if details:
        text += f" ({'; '.join(details)})"
    if waiting and d.next_attempt_at:
        wait = d.next_attempt_at - time.time()
        at = time.strftime("%H:%M:%S", time.localtime(d.next_attempt_at))
        text += f", next attempt at {at}" + (f" (in {wait:.0f} s)" if wait > 0 else " (due)")
    return text


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node.catalog import Catalog, queries

    catalog = Catalog(_settings(args).database.url)
    jobs = catalog.list_jobs(state=args.state, limit=args.limit)
    unmatched, _ = queries.unmatched_series(catalog, limit=0)
    now = time.time()
    lines = [f"{'ID':>5}  {'STATE':<10} {'MODEL':<16} {'AGE':>7}  SERIES / REASON"]
    deliveries = {job.id: catalog.deliveries(job.id) for job in jobs}
    series = queries.series_by_uid(catalog, {j.series_instance_uid for j in jobs})
    for job in jobs:
        age = f"{now - job.created_at:.0f}s"
        # A shadow job reads "done (shadow)": kept in the node, never delivered.
        row = series.get(job.series_instance_uid)
        study = f"  study {_study_date(row.study_date)}" if row is not None and row.study_date else ""
        lines.append(f"{job.id:>5}  {job.state_label:<10} {job.model:<16} {age:>7}  {job.series_instance_uid}{study}")
        if job.reason:
            lines.append(f"{'':>36}{job.reason}")
        lines.extend(f"{'':>36}{_delivery_line(d, _waiting(job))}" for d in deliveries[job.id])
    text = "\n".join(lines) if jobs else "no jobs"
    if unmatched:
        text += f"\n{unmatched} series matched no rule (no job): dicom-node series --unmatched"
    _print(args, [_job_dict(j, deliveries[j.id], series.get(j.series_instance_uid)) for j in jobs], text)
    return 0


def _job_action(args: argparse.Namespace, action: str) -> int:
    from dicom_node.catalog import Catalog, CatalogError, JobState
    from dicom_node.scheduling.operator import retry_job
    from workers.app import CeleryJobQueue, create_celery_app

    settings = _settings(args)
    catalog = Catalog(settings.database.url)
    try:
        if action == "retry":
            what = retry_job(catalog, CeleryJobQueue(create_celery_app(settings)), args.job,
                             reason="retried by operator (cli)")
        else:
            catalog.transition(args.job, JobState.CANCELLED, reason="cancelled by operator (cli)")
            what = f"job {args.job} cancelled"
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    job = catalog.get_job(args.job)
    assert job is not None
    _print(args, {**_job_dict(job), "action": what}, f"job {job.id} is now {job.state} ({what})")
    return 0


def _series_action(args: argparse.Namespace, action: str) -> int:
    """resend, rerun, reprocess: audited operator actions on stored results and series."""
    from dicom_node.catalog import Catalog, CatalogError
    from dicom_node.scheduling import operator
    from workers.app import CeleryJobQueue, create_celery_app

    settings = _settings(args)
    catalog = Catalog(settings.database.url)
    to = [_destination(settings, name).name for name in (getattr(args, "to", None) or [])]
    queue = CeleryJobQueue(create_celery_app(settings))
    try:
        if action == "resend":
            report = operator.resend(catalog, queue, settings, args.target, to=to, by="cli")
        elif action == "rerun":
            report = operator.rerun(catalog, queue, settings, args.series, model=args.model, by="cli")
        else:
            report = operator.reprocess(catalog, queue, settings, args.uid, by="cli")
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print(args, {"jobs": report.job_ids, "messages": report.lines}, "\n".join(report.lines))
    return 0 if report.job_ids else 1


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90m``, ``24h``, ``7d``) or a UTC date/time
    (``2026-12-01``, ``2026-12-01T08:00``); returns a Unix time."""
    import datetime as dt
    import re

    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: give a duration (90m, 24h, 7d) or a date (2026-12-01)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def cmd_shadow_report(args: argparse.Namespace) -> int:
    """Agreement of shadow models with the live models on the same series."""
    from dicom_node.catalog import Catalog
    from dicom_node.shadow import build_report, compare_pending, format_report

    settings = _settings(args)
    catalog = Catalog(settings.database.url)
    since = parse_since(args.since) if args.since else None
    # Pairs a worker did not compare (it died between the job's end and the comparison).
    compare_pending(catalog, settings.outbox)
    report = build_report(catalog, model=args.model, since=since)
    if args.format == "json" or args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report, series=not args.summary), end="")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from dicom_node.catalog import Catalog
    from dicom_node.retention import collect_garbage

    settings = _settings(args)
    days = settings.storage.retention_days if args.older_than_days is None else args.older_than_days
    if days <= 0:
        _print(args, {"series": [], "disabled": True},
               "retention is off (storage.retention_days = 0); nothing removed")
        return 0
    report = collect_garbage(settings, Catalog(settings.database.url), older_than_days=days, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    _print(args, {"series": report.series, "jobs": report.jobs, "files": report.files, "bytes": report.bytes,
                  "dry_run": report.dry_run},
           f"{verb} {len(report.series)} series ({report.files} files, {report.bytes / 1e6:.1f} MB, "
           f"{report.jobs} jobs) older than {days:g} days")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    """Drift per model and scanner and silent scanners; exit 1 when one drifts or went silent
    (for a cron job or a monitoring check that has no Prometheus)."""
    from dicom_node.catalog import Catalog
    from dicom_node.drift.monitor import evaluate
    from dicom_node.web.drift import drift_out

    settings = _settings(args)
    out = drift_out(evaluate(Catalog(settings.database.url), settings.drift), settings.drift)
    lines = [f"baseline: {out.baseline}; recent: {out.window}; alert above PSI {out.psi_alert:g}"]
    lines += [f"{'model':<20} {'scanner':<20} {'status':<10} {'jobs':>9} {'max PSI':>8}  drifting most"]
    for p in out.pairs:
        psi = "" if p.max_psi is None else f"{p.max_psi:.3f}"
        lines.append(f"{p.model[:20]:<20} {p.scanner:<20} {p.status:<10} "
                     f"{f'{p.baseline_jobs}/{p.recent_jobs}':>9} {psi:>8}  {p.worst_feature or ''}")
    for sc in out.scanners:
        if sc.silent:
            lines.append(f"scanner {sc.label} ({sc.manufacturer} {sc.model_name} {sc.station}) is silent: "
                         f"no series for {(time.time() - sc.last_seen) / 86400:.1f} days")
    if not out.pairs:
        lines.append("no observations yet: each job whose results are encoded adds one")
    _print(args, out.model_dump(), "\n".join(lines))
    return 1 if out.alerts or out.silent else 0


def _reach(bind_host: str) -> str:
    """The address to reach a server of this node bound to ``bind_host`` (a wildcard bind
    address is reached on loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::") else bind_host  # noqa: S104 - compared, not bound


def _own_listener(settings: Settings) -> DestinationSettings:
    """This node's listener as a destination."""
    lst = settings.listener
    return DestinationSettings(name="this node", ae_title=lst.ae_title, host=_reach(lst.host), port=lst.port)


#: Groups of rejected associations ``status`` prints (the JSON has them all).
STATUS_REJECTED_LINES = 10


def _rejected_associations(settings: Settings) -> dict[str, Any]:
    """The listener's recent rejections, grouped, from the running ``serve``'s web API: they are
    kept in its memory only (:mod:`dicom_node.ingest.rejections`), never in the catalog.
    ``error`` says why they are unknown (web server off or not answering)."""
    import urllib.error
    import urllib.request
    from dataclasses import asdict

    from dicom_node.ingest.rejections import Rejection, group

    web = settings.web
    host = _reach(web.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{web.port}/api/rejected-associations"
    if not web.enabled:
        return {"source": None, "error": "[web] enabled = false: they are shown through serve's web API"}
    try:
        with urllib.request.urlopen(url, timeout=5) as rsp:
            body = json.loads(rsp.read())
        rejections = [Rejection(float(r["at"]), str(r["calling_ae_title"]), str(r["called_ae_title"]),
                                str(r["peer"]), str(r["reason"])) for r in body["rejections"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return {"source": url, "error": f"the web server did not answer: {why}"}
    return {"source": url, "error": None, "total": int(body["total"]), "kept": int(body["kept"]),
            "groups": [asdict(g) for g in group(rejections)]}


def _rejected_lines(rejected: dict[str, Any]) -> str:
    import datetime as dt

    if rejected["error"]:
        return (f"rejected  unknown ({rejected['error']}); "
                "the log's association_rejected lines have them")
    if not rejected["total"]:
        return "rejected  none since the node started"
    groups = rejected["groups"]
    text = f"rejected  {rejected['total']} since the node started" + (
        f" (the newest {rejected['kept']} are kept)" if rejected["total"] > rejected["kept"] else "")
    for g in groups[:STATUS_REJECTED_LINES]:
        last = dt.datetime.fromtimestamp(g["last_at"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        text += (f"\n          {g['calling_ae_title'] or '(empty)'} from {g['peer_host']} "
                 f"calling {g['called_ae_title'] or '(empty)'}: {g['reason']}, "
                 f"{g['count']} time{'s' if g['count'] != 1 else ''}, last {last}")
    if len(groups) > STATUS_REJECTED_LINES:
        text += f"\n          ... {len(groups) - STATUS_REJECTED_LINES} more (--json, or the dashboard)"
    return text


def cmd_status(args: argparse.Namespace) -> int:
    """One screen for ops: listener, queue, workers, disk, senders, rejected associations, recent failures."""
    from dicom_node.catalog import Catalog, JobState, queries
    from dicom_node.catalog.heartbeats import worker_statuses
    from dicom_node.catalog.senders import sender_stats
    from dicom_node.delivery.dicom import probe_echo
    from dicom_node.ingest.spool import Spool

    settings = _settings(args)
    catalog = Catalog(settings.database.url)
    lst = settings.listener
    # A listener that rejects the probe's association (an allow-list without the node's own AE
    # title) is up: only "down" is a failure.
    probe, probe_detail = (probe_echo(_own_listener(settings), calling_ae_title=lst.ae_title, timeout=5)
                           if lst.tls is None else ("not probed", "TLS"))
    listening = {"answers": True, "down": False}.get(probe)
    by_state = catalog.count_jobs_by_state()
    by_priority = {priority: n for (queue, priority), (n, _) in catalog.queue_depth().items() if queue == "inference"}
    workers = worker_statuses(catalog)
    failures = catalog.list_jobs(state=JobState.FAILED.value, limit=5)
    unmatched, _ = queries.unmatched_series(catalog, limit=0)
    senders = sorted(sender_stats(catalog, settings.completion.learn_min_series).values(),
                     key=lambda st: (st.calling_ae_title, st.rule))
    free_mb = Spool(settings.storage.root).free_mb()
    rejected = _rejected_associations(settings)
    data: dict[str, Any] = {
        "listener": {"ae_title": lst.ae_title, "host": lst.host, "port": lst.port, "answers_echo": listening,
                     "probe": probe, "probe_detail": probe_detail},
        "jobs_by_state": by_state,
        "queued_by_priority": by_priority,
        "workers": [{"hostname": w.hostname, "pid": w.pid, "alive": w.alive, "queues": list(w.queues),
                     "device": w.device, "current_job_id": w.current_job_id, "current_model": w.current_model}
                    for w in workers],
        "disk": {"free_mb": round(free_mb, 1), "min_free_mb": settings.storage.min_free_mb,
                 "accepting": free_mb >= settings.storage.min_free_mb},
        "recent_failures": [{"id": j.id, "model": j.model, "reason": j.reason} for j in failures],
        "unmatched_series": unmatched,
        "senders": [{"calling_ae_title": st.calling_ae_title, "rule": st.rule, "mode": st.mode,
                     "series": st.series, "splits": st.splits, "split_rate": round(st.split_rate, 4),
                     "premature": st.premature} for st in senders],
        "rejected_associations": rejected,
    }
    echo_text = {"answers": "answers C-ECHO", "down": "NOT ANSWERING",
                 "rejected": f"up, but rejected this probe from {lst.ae_title} ({probe_detail})",
                 "not probed": "TLS (not probed)"}[probe]
    lines = [f"listener  {lst.ae_title}@{lst.host}:{lst.port}  {echo_text}",
             "jobs      " + (", ".join(f"{k} {v}" for k, v in sorted(by_state.items())) or "none"),
             "queued    " + (", ".join(f"{k} {v}" for k, v in sorted(by_priority.items())) or "none"),
             f"disk      {free_mb:,.0f} MB free (watermark {settings.storage.min_free_mb} MB)"
             + ("" if data["disk"]["accepting"] else "  REFUSING C-STORE (0xA700)")]
    alive = [w for w in workers if w.alive]
    lines.append(f"workers   {len(alive)} alive" + "".join(
        f"\n          {w.hostname} pid {w.pid} [{','.join(w.queues)}] {w.device or ''}"
        + (f" running job {w.current_job_id} ({w.current_model})" if w.current_job_id else " idle")
        for w in alive))
    lines.append(f"unmatched {unmatched} series" + (" (no rule matched: dicom-node series --unmatched)"
                                                     if unmatched else ""))
    lines.append("senders   " + ("none yet" if not senders else "".join(
        f"\n          {st.calling_ae_title} rule {st.rule or '(none)'}: "
        + ("completes at release" if st.mode == "association" else "idle timer")
        + f", split rate {100 * st.split_rate:.0f} % of {st.series} series"
        + (f", {st.premature} premature" if st.premature else "")
        for st in senders)))
    lines.append(_rejected_lines(rejected))
    lines.append("failures  " + ("none" if not failures else "".join(
        f"\n          job {j.id} {j.model}: {j.reason}" for j in failures)))
    _print(args, data, "\n".join(lines))
    return 1 if probe == "down" else 0


def cmd_send(args: argparse.Namespace) -> int:
    """Send a folder of DICOM files to a destination (default: this node's own listener)."""
    from pydicom.misc import is_dicom

    from dicom_node.delivery import send_files
    from dicom_node.errors import TransientError

    settings = _settings(args)
    if args.to:
        dest = _destination(settings, args.to)
    else:
        dest = _own_listener(settings)
    root = Path(args.directory)
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file() and is_dicom(p))
    if not files:
        print(f"error: no DICOM files in {root}", file=sys.stderr)
        return 1
    calling = args.calling_ae_title or dest.calling_ae_title or settings.listener.ae_title
    sent, width = 0, 30
    show = sys.stderr.isatty() or args.progress
    try:
        for start in range(0, len(files), args.batch):
            report = send_files(dest, files[start:start + args.batch], calling_ae_title=calling)
            sent += report.sent
            if show and not args.json:
                done = int(width * sent / len(files))
                print(f"\r[{'#' * done}{'.' * (width - done)}] {sent}/{len(files)}", end="", file=sys.stderr,
                      flush=True)
    except (TransientError, PermanentError) as exc:
        if show and not args.json:
            print(file=sys.stderr)
        _print(args, {"destination": dest.name, "sent": sent, "total": len(files), "error": str(exc)},
               f"sent {sent} of {len(files)} files to {dest.address}, then: {exc}")
        return 1
    if show and not args.json:
        print(file=sys.stderr)
    _print(args, {"destination": dest.name, "sent": sent, "total": len(files)},
           f"sent {sent} files to {dest.address}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the synthetic demo chest CT (no patient data) into a folder."""
    from dicom_node.demo import DEMO_NODULE, write_chest_series

    out = Path(args.directory)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    _, paths = write_chest_series(out)
    x, y, z = DEMO_NODULE.centre
    _print(args, {"directory": str(out), "files": len(paths),
                  "nodule": {"centre_lps_mm": list(DEMO_NODULE.centre), "diameter_mm": DEMO_NODULE.diameter_mm}},
           f"wrote {len(paths)} CT slices (synthetic chest, {DEMO_NODULE.diameter_mm:g} mm nodule at "
           f"LPS {x:g}, {y:g}, {z:g} mm) into {out}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a DICOM destination; for a DICOMweb one, an authenticated QIDO-RS request."""
    from dicom_node.delivery import reachable

    settings = _settings(args)
    dest = _destination(settings, args.destination)
    if args.capabilities:
        return _echo_capabilities(args, dest, dest.calling_ae_title or settings.listener.ae_title)
    ok, why = reachable(dest, calling_ae_title=dest.calling_ae_title or settings.listener.ae_title)
    _print(args, {"destination": dest.name, "ok": ok, "detail": why},
           f"{dest.name} ({dest.address}): {'OK' if ok else 'FAILED'}, {why}")
    return 0 if ok else 1


def _echo_capabilities(args: argparse.Namespace, dest: Any, calling: str) -> int:
    """Propose each result class to a DICOM destination and list which it accepts."""
    from pydicom.uid import UID

    from dicom_node.delivery.dicom import capabilities
    from dicom_node.errors import TransientError

    if dest.type != "dicom":
        raise UsageError(f"--capabilities negotiates DICOM presentation contexts; {dest.name} is {dest.type}")
    try:
        accepted = capabilities(dest, calling_ae_title=calling)
    except TransientError as exc:
        _print(args, {"destination": dest.name, "ok": False, "detail": str(exc)}, f"{dest.name}: FAILED, {exc}")
        return 1
    classes = [{"sop_class_uid": uid, "name": UID(uid).name, "accepted": ok} for uid, ok in accepted.items()]
    lines = [f"{dest.name} ({dest.address}) result classes:"] + [
        f"  {'accepted' if c['accepted'] else 'REFUSED ':<9} {c['name']}" for c in classes
    ]
    _print(args, {"destination": dest.name, "ok": True, "classes": classes}, "\n".join(lines))
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from dicom_node.catalog.recorder import instance_from_file
    from dicom_node.scheduling.routing import evaluate

    settings = _settings(args)
    if not Path(args.directory).exists():
        raise UsageError(f"no such file or folder: {args.directory}")
    series: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(args.directory).rglob("*")):
        if not path.is_file():
            continue
        try:
            inst = instance_from_file(path)
        except Exception:  # noqa: S112 - a folder may hold anything; skip what is not DICOM
            continue
        entry = series.setdefault(inst.series_instance_uid, {"attrs": dict(inst.attributes), "count": 0})
        entry["count"] += 1
        entry["attrs"]["SOPClassUID"] = inst.sop_class_uid
    out = []
    lines = []
    for uid, entry in series.items():
        attrs = {**entry["attrs"], "InstanceCount": entry["count"]}
        results = [evaluate(rule, attrs) for rule in settings.rules]
        out.append({"series_instance_uid": uid, "instances": entry["count"],
                    "rules": [{"rule": r.rule.name, "matched": r.matched, "reasons": list(r.reasons),
                               "models": r.rule.models if r.matched else []} for r in results]})
        lines.append(f"series {uid} ({entry['count']} instances, {attrs.get('Modality', '?')})")
        for r in results:
            lines.append(f"  {'MATCH' if r.matched else 'no   '} {r.rule.name}: {'; '.join(r.reasons)}")
    _print(args, out, "\n".join(lines) if lines else "no DICOM files found")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dicom_node.catalog import JobState

    parser = argparse.ArgumentParser(
        prog="dicom-node", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="first steps: dicom-node config check, then dicom-node serve; see docs/quickstart.md "
               "and docs/admin-guide.md. 'dicom-node COMMAND --help' describes each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {dicom_node.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", default=None, help="TOML file (default config/dicom-node.toml)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    log_help = "log lines as JSON (for a log collector), as coloured text, or auto: text on a terminal, else JSON"
    p = add("serve", cmd_serve, "run the node: listener, completion, jobs (and a worker for the embedded broker)")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto", help=log_help)
    p = add("worker", cmd_worker, "run a Celery worker (inference and dispatch queues)")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto", help=log_help)
    p.add_argument("--queues", "-Q", default=None, help="comma-separated queues (default inference,dispatch)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="worker processes (default [worker] concurrency of the configuration)")
    p.add_argument("--hostname", default=None, help="worker node name (default celery@host)")
    p.add_argument("--banner", action="store_true", help="print Celery's start-up banner (off by default)")
    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    p = cfg_sub.add_parser("check", help="validate the configuration, the rules' models and modalities")
    p.add_argument("--config", "-c", default=None, help="TOML file (default config/dicom-node.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--probe", action="store_true", help="also C-ECHO every destination (exit 1 if one does not answer)")
    p.set_defaults(func=cmd_config_check)
    p = add("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--state", default=None, choices=[s.value for s in JobState], help="only jobs in this state")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs (default 50)")
    p = add("series", cmd_series, "list stored series, newest first (--unmatched: those no rule matched, and why)")
    p.add_argument("--unmatched", action="store_true",
                   help="only complete series without a job: the rule keys that decided are shown")
    p.add_argument("--limit", type=int, default=50, help="at most this many series (default 50)")
    p = add("retry", lambda a: _job_action(a, "retry"),
            "finish a failed or cancelled job: deliver its results, or run it again "
            "(per-state table in docs/operations.md)")
    p.add_argument("job", type=int)
    p = add("cancel", lambda a: _job_action(a, "cancel"), "cancel a job")
    p.add_argument("job", type=int)
    p = add("resend", lambda a: _series_action(a, "resend"),
            "deliver the stored results of a job or series again, without running the model")
    p.add_argument("target", metavar="JOB|SERIES", help="a job id, or a Series Instance UID (its newest results)")
    p.add_argument("--to", action="append", default=None, metavar="DEST",
                   help="only this configured destination (repeatable; default: the job's destinations)")
    p = add("rerun", lambda a: _series_action(a, "rerun"),
            "run the models of a processed series again, as a new generation")
    p.add_argument("series", metavar="SERIES", help="a Series Instance UID")
    p.add_argument("--model", default=None, help="only this model (default: every model that ran on it)")
    p = add("reprocess", lambda a: _series_action(a, "reprocess"),
            "apply the routing rules again to a stored series or study, as a new generation")
    p.add_argument("uid", metavar="STUDY|SERIES", help="a Study or Series Instance UID")
    p = add("gc", cmd_gc, "remove delivered series older than storage.retention_days")
    p.add_argument("--older-than-days", type=float, default=None, help="override storage.retention_days")
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    add("drift", cmd_drift, "input and output drift per model and scanner (PSI), silent scanners; exit 1 on either")
    p = add("status", cmd_status,
            "one screen: listener, queue, workers, disk, rejected associations, recent failures")
    p = add("send", cmd_send, "send a folder of DICOM files to this node (or --to DEST), with a progress bar")
    p.add_argument("directory")
    p.add_argument("--to", default=None, help="a configured destination name (default: this node's listener)")
    p.add_argument("--calling-ae-title", default=None,
                   help="our AE title towards the peer (default the destination's, else the listener's)")
    p.add_argument("--batch", type=int, default=50, help="files per association")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    p = add("demo", cmd_demo, "write a synthetic chest CT with a 20 mm lung nodule (no patient data) into DIR")
    p.add_argument("directory", metavar="DIR")
    p = add("echo", cmd_echo, "check a configured destination: C-ECHO, or an authenticated QIDO-RS for DICOMweb")
    p.add_argument("destination")
    p.add_argument("--capabilities", action="store_true",
                   help="propose each result class (SEG, SR, GSPS, KOS, SC) and list which it accepts")
    shadow = sub.add_parser("shadow", help="shadow mode: compare shadow models with the live models")
    shadow_sub = shadow.add_subparsers(dest="shadow_command", required=True)
    p = shadow_sub.add_parser("report", help="agreement (Dice, volumes, findings) of shadow vs live models per series")
    p.add_argument("--config", "-c", default=None, help="TOML file (default config/dicom-node.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output (= --format json)")
    p.add_argument("--model", default=None, help="only comparisons where this model is the shadow or the live one")
    p.add_argument("--since", default=None, help="only comparisons since: a duration (24h, 7d) or a UTC date")
    p.add_argument("--format", choices=["text", "json"], default="text", help="text tables (default) or JSON")
    p.add_argument("--summary", action="store_true", help="one block per model pair, without the per-series list")
    p.set_defaults(func=cmd_shadow_report)
    rules = sub.add_parser("rules", help="routing rule commands")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    p = rules_sub.add_parser("test", help="show which rules match the series in a folder, and why")
    p.add_argument("directory", help="a folder (searched recursively) or one DICOM file")
    p.add_argument("--config", "-c", default=None, help="TOML file (default config/dicom-node.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rules_test)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "worker"):
        # Short commands print results on stdout; their log lines (warnings only) go to stderr.
        # pynetdicom's own lines ("Association Aborted") are not mixed in: the command says
        # what happened in its own words.
        import logging

        from dicom_node.logs import configure_logging

        configure_logging("console", level="WARNING")
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Piped into `head`: the reader left.  Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and end quietly.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
