"""Worker heartbeats: which worker processes are alive, on which queues, running which job.

Each worker process (the Celery main process and every pool child) keeps one row keyed by
``(hostname, pid)`` fresh every few seconds (``workers.heartbeat`` writes them).  The web
dashboard, ``/readyz`` and ``/metrics`` read them through :func:`worker_statuses`.

The table (``dicom_node.catalog.WorkerHeartbeatRow``) lives in the catalog database and is
created by the schema migrations like every other table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select

from dicom_node.catalog import Catalog, WorkerHeartbeatRow

#: A worker whose last heartbeat is older than this (seconds) counts as gone.
ALIVE_WITHIN_S = 30.0


@dataclass(frozen=True)
class WorkerStatus:
    """One worker process as the dashboard shows it."""

    hostname: str
    pid: int
    queues: tuple[str, ...]
    device: str | None
    started_at: float
    last_seen: float
    age_s: float
    alive: bool
    current_job_id: int | None
    current_model: str | None
    current_since: float | None
    #: Models the process holds in memory, least recently used first: ``name``, ``version``,
    #: ``device``, ``loaded_at``, ``last_used``, ``load_s``, ``uses``.
    warm_models: tuple[Mapping[str, Any], ...] = field(default=())


#: Keys of a warm-model entry the catalog keeps (anything else a worker sends is dropped).
WARM_MODEL_KEYS = ("name", "version", "device", "loaded_at", "last_used", "load_s", "uses")


def _warm_json(models: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([{k: m.get(k) for k in WARM_MODEL_KEYS} for m in models])


def beat(
    catalog: Catalog,
    hostname: str,
    pid: int,
    *,
    queues: Sequence[str],
    device: str | None,
    warm_models: Sequence[Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> None:
    """Record that process ``pid`` of worker ``hostname`` is alive now (and, when given, the
    models it holds warm)."""
    now = time.time() if now is None else now
    warm = None if warm_models is None else _warm_json(warm_models)
    with catalog.session() as s:
        row = s.get(WorkerHeartbeatRow, (hostname, pid))
        if row is None:
            s.add(
                WorkerHeartbeatRow(
                    hostname=hostname,
                    pid=pid,
                    queues=",".join(queues),
                    device=device,
                    started_at=now,
                    last_seen=now,
                    warm_models_json=warm,
                )
            )
            return
        row.last_seen = now
        row.queues = ",".join(queues)
        if device is not None:
            row.device = device
        if warm is not None:
            row.warm_models_json = warm


def set_current_job(
    catalog: Catalog,
    hostname: str,
    pid: int,
    job_id: int | None,
    model: str | None,
    *,
    queues: Sequence[str],
    device: str | None,
    warm_models: Sequence[Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> None:
    """Record the job process ``pid`` started (``job_id=None``: it finished and is idle)."""
    now = time.time() if now is None else now
    beat(catalog, hostname, pid, queues=queues, device=device, warm_models=warm_models, now=now)
    with catalog.session() as s:
        row = s.get(WorkerHeartbeatRow, (hostname, pid))
        if row is not None:
            row.current_job_id = job_id
            row.current_model = model if job_id is not None else None
            row.current_since = now if job_id is not None else None


def remove(catalog: Catalog, hostname: str, pid: int | None = None) -> None:
    """Forget a process (or every process of ``hostname``) that shut down cleanly."""
    with catalog.session() as s:
        stmt = delete(WorkerHeartbeatRow).where(WorkerHeartbeatRow.hostname == hostname)
        if pid is not None:
            stmt = stmt.where(WorkerHeartbeatRow.pid == pid)
        s.execute(stmt)


def worker_statuses(
    catalog: Catalog,
    *,
    within_s: float = ALIVE_WITHIN_S,
    include_stale_s: float = 600.0,
    now: float | None = None,
) -> list[WorkerStatus]:
    """Worker processes seen in the last ``include_stale_s`` seconds, alive or not, by hostname."""
    now = time.time() if now is None else now
    with catalog.session() as s:
        rows = list(
            s.scalars(
                select(WorkerHeartbeatRow)
                .where(WorkerHeartbeatRow.last_seen >= now - include_stale_s)
                .order_by(WorkerHeartbeatRow.hostname, WorkerHeartbeatRow.pid)
            )
        )
    return [
        WorkerStatus(
            hostname=r.hostname,
            pid=r.pid,
            queues=tuple(q for q in r.queues.split(",") if q),
            device=r.device,
            started_at=r.started_at,
            last_seen=r.last_seen,
            age_s=max(0.0, now - r.last_seen),
            alive=now - r.last_seen <= within_s,
            current_job_id=r.current_job_id,
            current_model=r.current_model,
            current_since=r.current_since,
            warm_models=tuple(r.warm_models),
        )
        for r in rows
    ]


def warm_by_model(workers: Sequence[WorkerStatus]) -> dict[str, list[dict[str, Any]]]:
    """Model name -> where it is warm: one entry per live process holding it (``hostname``,
    ``pid``, ``device``, ``version``, ``loaded_at``, ``last_used``, ``uses``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        if not w.alive:
            continue
        for m in w.warm_models:
            name = str(m.get("name"))
            out.setdefault(name, []).append({
                "hostname": w.hostname, "pid": w.pid, "device": m.get("device"), "version": m.get("version"),
                "loaded_at": m.get("loaded_at"), "last_used": m.get("last_used"), "uses": m.get("uses"),
            })
    return out


def alive_workers(
    catalog: Catalog,
    queue: str | None = None,
    *,
    within_s: float = ALIVE_WITHIN_S,
    now: float | None = None,
) -> list[WorkerStatus]:
    """Processes with a heartbeat in the last ``within_s`` s (consuming ``queue``, if given)."""
    return [
        w
        for w in worker_statuses(catalog, within_s=within_s, include_stale_s=within_s, now=now)
        if w.alive and (queue is None or queue in w.queues)
    ]
