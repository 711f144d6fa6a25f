"""``/api/shadow``: the agreement of shadow models with the live models (shadow mode).

Its own router (and the dashboard's own panel, ``templates/partials/shadow_panel.html`` with
``static/shadow.js``), so the shadow-mode views stay apart from the rest of the API.  It reads
the comparisons stored by the workers (:mod:`dicom_node.shadow`); it never computes one, so a
dashboard refresh costs one query.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from dicom_node.shadow import build_report
from dicom_node.web.api import ApiContext


class ShadowSeries(BaseModel):
    series_instance_uid: str
    generation: int
    shadow_job_id: int
    live_job_id: int
    computed_at: float
    dice: float | None = Field(description="Mean Dice over matched labels (or of the overall foreground).")
    basis: str = Field(description="labels, foreground, or why there is no figure (no prediction, grid differs).")
    dice_per_label: dict[str, float]
    volumes_ml: dict[str, dict[str, float]]
    shadow_findings: int
    live_findings: int
    matched_findings: int


class ShadowPair(BaseModel):
    shadow_model: str
    live_model: str
    series: int = Field(description="Series both models ran on.")
    comparisons: int
    mean_dice: float | None
    shadow_findings: int
    live_findings: int
    matched_findings: int
    finding_agreement: float = Field(description="2 x matched / (shadow + live findings); 1 when neither found any.")
    mean_volumes_ml: dict[str, dict[str, float | None]]
    series_list: list[ShadowSeries]


class RuleModeEvent(BaseModel):
    at: float
    rule: str
    old_mode: str
    new_mode: str
    models: str
    detail: str


class ShadowReport(BaseModel):
    pairs: list[ShadowPair]
    events: list[RuleModeEvent] = Field(description="Rule mode changes recorded at start-up, newest first.")
    generated_at: float


def create_shadow_router(ctx: ApiContext) -> APIRouter:
    """``GET /api/shadow``."""
    router = APIRouter(prefix="/api")

    @router.get("/shadow", response_model=ShadowReport, tags=["models"],
                summary="Shadow models compared with the live models on the same series")
    def shadow_report(
        model: str | None = None, since: Annotated[float | None, Query(description="Unix time")] = None,
        series_limit: Annotated[int, Query(ge=0, le=1000)] = 50,
    ) -> dict[str, Any]:
        return build_report(ctx.catalog, model=model, since=since, series_limit=series_limit)

    return router
