"""The dashboard: server-rendered page shells, filled and refreshed by ``static/app.js``.

UI actions (retry, cancel) call the same token-protected API as any client: the page asks for
the token once and keeps it in ``sessionStorage`` (gone when the tab closes).  There is no
unauthenticated UI shortcut, so the dashboard can never do more than the API allows.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from dicom_node.catalog import JobState, queries
from dicom_node.metrics import STAGE_DEFINITIONS, STAGES
from dicom_node.scheduling.routing import deciding_reasons
from dicom_node.web.api import ApiContext
from dicom_node.web.latency import LATENCY_STAGES

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


def create_pages_router(ctx: ApiContext) -> APIRouter:
    """HTML routes: ``/`` (dashboard), ``/jobs/{id}`` (one job), ``/series/{uid}`` (one series)."""
    router = APIRouter(include_in_schema=False)
    common = {
        "ae_title": ctx.settings.listener.ae_title,
        "states": [s.value for s in JobState],
        "stages": STAGES,
        "stage_definitions": STAGE_DEFINITIONS,
        "latency_stages": LATENCY_STAGES,
        "token_configured": bool(ctx.settings.web.api_token),
    }

    @router.get("/", response_class=HTMLResponse)
    def dashboard(request: Request, state: str | None = None) -> HTMLResponse:
        selected = state if state in common["states"] else ""  # type: ignore[operator]
        return TEMPLATES.TemplateResponse(
            request, "dashboard.html", {**common, "selected_state": selected}
        )

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: int) -> HTMLResponse:
        job = ctx.catalog.get_job(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
        series = ctx.catalog.get_series(job.series_instance_uid)
        return TEMPLATES.TemplateResponse(request, "job.html", {**common, "job": job, "series": series})

    @router.get("/series/{series_instance_uid}", response_class=HTMLResponse)
    def series_page(request: Request, series_instance_uid: str) -> HTMLResponse:
        series = ctx.catalog.get_series(series_instance_uid)
        if series is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"series {series_instance_uid} not found")
        jobs = queries.jobs_of_series(ctx.catalog, series_instance_uid)
        unmatched = series.state == "complete" and not any(j.generation == series.generation for j in jobs)
        routing = deciding_reasons(ctx.settings.rules, series.routing_attributes()) if unmatched else []
        return TEMPLATES.TemplateResponse(
            request, "series.html", {**common, "series": series, "jobs": list(reversed(jobs)), "routing": routing}
        )

    return router
