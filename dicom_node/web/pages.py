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

from dicom_node.catalog import JobState
from dicom_node.metrics import STAGE_DEFINITIONS, STAGES
from dicom_node.web.api import ApiContext

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


def create_pages_router(ctx: ApiContext) -> APIRouter:
    """HTML routes: ``/`` (dashboard) and ``/jobs/{id}`` (one job)."""
    router = APIRouter(include_in_schema=False)
    common = {
        "ae_title": ctx.settings.listener.ae_title,
        "states": [s.value for s in JobState],
        "stages": STAGES,
        "stage_definitions": STAGE_DEFINITIONS,
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
        return TEMPLATES.TemplateResponse(request, "job.html", {**common, "job": job})

    return router
