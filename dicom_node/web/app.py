"""The web app of a node: dashboard pages, ``/api``, ``/metrics``, ``/healthz``, ``/readyz``.

``create_app`` builds it from the objects the node already has; it owns no thread and no
connection of its own (``dicom_node.web.server.WebServer`` runs it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.catalog import Catalog, queries
from dicom_node.catalog import heartbeats as heartbeat
from dicom_node.catalog.tables import KEEPS_FIRST_INSTANCE
from dicom_node.delivery.probe import Reachability
from dicom_node.drift.monitor import DriftMonitor
from dicom_node.drift.prometheus import DriftCollector
from dicom_node.ingest.rejections import RejectionLog
from dicom_node.metrics import NodeMetrics
from dicom_node.scheduling.jobs import JobQueue
from dicom_node.settings import Settings
from dicom_node.web.api import ApiContext, create_router
from dicom_node.web.drift import create_drift_router
from dicom_node.web.latency import create_latency_router
from dicom_node.web.pages import create_pages_router
from dicom_node.web.shadow import create_shadow_router

#: A readiness check result: (passed, one sentence saying what was seen).
Check = tuple[bool, str]
Readiness = Callable[[], dict[str, Check]]

WEB_DIR = Path(__file__).resolve().parent


def database_check(catalog: Catalog) -> Check:
    """The catalog database answers ``SELECT 1``."""
    try:
        queries.ping(catalog)
    except Exception as exc:  # readiness reports any failure as a failed check, never raises
        return False, f"database unreachable: {type(exc).__name__}: {exc}"
    return True, "database reachable"


def worker_check(
    catalog: Catalog, queue: str = "inference", within_s: float = heartbeat.ALIVE_WITHIN_S
) -> Check:
    """At least one worker consuming ``queue`` sent a heartbeat in the last ``within_s`` seconds."""
    try:
        alive = heartbeat.alive_workers(catalog, queue, within_s=within_s)
    except Exception as exc:  # a failed query is a failed check
        return False, f"cannot read worker heartbeats: {type(exc).__name__}: {exc}"
    if not alive:
        return False, f"no {queue} worker heartbeat in the last {within_s:g} s"
    return True, f"{len(alive)} {queue} worker process(es) alive"


def disk_check(free_mb: Callable[[], float], min_free_mb: float) -> Check:
    """Free spool space is above the ``storage.min_free_mb`` watermark."""
    try:
        free = free_mb()
    except OSError as exc:
        return False, f"cannot read free space of the spool: {exc}"
    if free < min_free_mb:
        return (
            False,
            f"spool has {free:.0f} MiB free, below the watermark "
            f"storage.min_free_mb = {min_free_mb:g}",
        )
    return True, f"spool has {free:.0f} MiB free (watermark {min_free_mb:g} MiB)"


def readiness_checks(
    *,
    broker: Callable[[], Check] | None = None,
    free_mb: Callable[[], float] | None = None,
    min_free_mb: float = 0.0,
    listener: Callable[[], Check] | None = None,
) -> Readiness:
    """Combine the checks that need objects the web app does not have (broker, spool, the
    DICOM listener accepting connections)."""

    def checks() -> dict[str, Check]:
        out: dict[str, Check] = {}
        if broker is not None:
            try:
                out["broker"] = broker()
            except Exception as exc:  # a raising check is a failing check
                out["broker"] = (False, f"broker check raised {type(exc).__name__}: {exc}")
        if free_mb is not None:
            out["disk"] = disk_check(free_mb, min_free_mb)
        if listener is not None:
            out["dicom_listener"] = listener()
        return out

    return checks


def create_app(
    settings: Settings,
    catalog: Catalog,
    queue: JobQueue,
    *,
    metrics: NodeMetrics | None = None,
    readiness: Readiness | None = None,
    destinations: Callable[[], Mapping[str, Reachability]] | None = None,
    rejections: RejectionLog | None = None,
) -> FastAPI:
    """Build the web app.

    Parameters
    ----------
    settings, catalog, queue
        The node's own; the queue receives retried jobs.
    metrics : NodeMetrics, optional
        Exposed on ``/metrics``; without it a catalog-only ``NodeMetrics`` is made (no listener
        counters).
    readiness : callable, optional
        Extra ``/readyz`` checks (broker, disk: see :func:`readiness_checks`); ``database`` and
        ``inference_worker`` are always checked.
    destinations : callable, optional
        The last reachability of each destination (:class:`DestinationProber`), reported by
        ``/readyz`` and ``/metrics`` without making the node unready: an archive that is down
        does not stop the node from receiving, and delivery retries.
    rejections : RejectionLog, optional
        The listener's rejected association requests (``/api/rejected-associations``, the
        dashboard's panel); the listener runs in the same process.
    """
    if metrics is None:
        metrics = NodeMetrics(catalog)
    started_at = time.time()
    app = FastAPI(
        # /docs is served below with Swagger UI vendored in static/swagger-ui: works offline.
        docs_url=None,
        title="dicom-node",
        version="0.1.0",
        description="Operations API of a dicom-node: jobs, series, deliveries, queues and workers. "
        "Mutating calls need 'Authorization: Bearer <web.api_token>'.",
    )
    ctx = ApiContext(settings, catalog, queue, rejections)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.include_router(create_router(ctx))
    app.include_router(create_latency_router(ctx))
    app.include_router(create_pages_router(ctx))
    app.include_router(create_shadow_router(ctx))
    drift = DriftMonitor(catalog, settings.drift)
    app.include_router(create_drift_router(drift))
    if settings.drift.enabled and not getattr(metrics, "drift_registered", False):
        metrics.registry.register(DriftCollector(drift))
        metrics.drift_registered = True  # type: ignore[attr-defined]
    app.mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static")

    @app.get("/docs", include_in_schema=False)
    def swagger_page() -> HTMLResponse:
        # Swagger UI's script and style from this node (static/swagger-ui), never from a CDN:
        # a hospital network often has no internet access.
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="dicom-node API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    @app.get("/healthz", tags=["operations"], summary="The process is up")
    def healthz() -> dict[str, object]:
        return {"status": "ok", "uptime_s": round(time.time() - started_at, 1)}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Ready to work: 503 naming the failing checks",
        responses={503: {"description": "one or more checks failed"}},
    )
    def readyz() -> JSONResponse:
        checks: dict[str, Check] = {"database": database_check(catalog)}
        checks["inference_worker"] = (
            worker_check(catalog)
            if checks["database"][0]
            else (False, "not checked: the database is unreachable")
        )
        if readiness is not None:
            checks.update(readiness())
        failing = sorted(name for name, (ok, _) in checks.items() if not ok)
        body: dict[str, object] = {
            "ready": not failing,
            "failing": failing,
            "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        }
        if destinations is not None:
            body["destinations"] = {
                name: {"reachable": r.reachable, "detail": r.detail, "checked_at": r.checked_at}
                for name, r in sorted(destinations().items())
            }
        # Not a readiness failure (the node works), but the archive hides corrected re-runs.
        keeps_first = queries.destination_findings(catalog, KEEPS_FIRST_INSTANCE) if checks["database"][0] else {}
        if keeps_first:
            body["warnings"] = {name: {"keeps_first_instance": detail} for name, detail in sorted(keeps_first.items())}
        return JSONResponse(body, status_code=503 if failing else 200)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus text exposition",
        response_class=Response,
    )
    def prometheus_metrics() -> Response:
        # Observe jobs finished since the last scrape first, so the histograms are current.
        metrics.observe_finished_jobs(catalog)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
