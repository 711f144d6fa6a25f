"""``/api/latency``: p50 / p95 seconds from a series' last instance to its results delivered,
per model, over a recent window (the dashboard's "Latency" panel).

Computed at request time from the catalog's own timestamps (``jobs_first_done_since``), so the
figures are exactly what the job rows say; nothing is cached, nothing drifts.  The percentiles
interpolate linearly between the two nearest values (numpy's default), so a test or an operator
can recompute them from ``/api/jobs`` or the database.  Its own module and router, so panels
added by other changes do not touch the same lines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from dicom_node.catalog import Catalog, queries
from dicom_node.metrics import STAGES, end_to_end_seconds, stage_durations
from dicom_node.web.api import ApiContext

#: The stages shown beside end to end: the waits and the work after the last instance
#: (``receive``, first to last instance, is the sender's pace, not the node's).
LATENCY_STAGES = tuple(s for s in STAGES if s != "receive")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between the closest
    ranks (``numpy.percentile``'s default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Quantiles(BaseModel):
    p50_s: float
    p95_s: float


class ModelLatency(BaseModel):
    model: str
    jobs: int = Field(description="Jobs of this model delivered in the window (each counted once).")
    end_to_end: Quantiles = Field(description="Last instance received to results delivered.")
    stages: dict[str, Quantiles] = Field(
        description="Per stage (as in /api/jobs `stages`), over the jobs where it was measured."
    )


class Latency(BaseModel):
    window_s: float
    models: list[ModelLatency]


def _quantiles(values: Sequence[float]) -> Quantiles:
    return Quantiles(p50_s=round(percentile(values, 50), 3), p95_s=round(percentile(values, 95), 3))


def latency_by_model(catalog: Catalog, *, window_s: float = 3600.0, now: float | None = None) -> Latency:
    """p50 / p95 end to end and per stage, per model, over jobs delivered in the last ``window_s``."""
    now = time.time() if now is None else now
    end_to_end: dict[str, list[float]] = {}
    stages: dict[str, dict[str, list[float]]] = {}
    for done in queries.jobs_first_done_since(catalog, now - window_s):
        e2e = end_to_end_seconds(done.job, done.last_instance_at)
        if e2e is None:
            continue
        model = done.job.model
        end_to_end.setdefault(model, []).append(e2e)
        per_stage = stages.setdefault(model, {s: [] for s in LATENCY_STAGES})
        for stage, seconds in stage_durations(done.job, done.series).items():
            if stage in per_stage and seconds is not None:
                per_stage[stage].append(seconds)
    models = [
        ModelLatency(
            model=model,
            jobs=len(values),
            end_to_end=_quantiles(values),
            stages={s: _quantiles(v) for s, v in stages[model].items() if v},
        )
        for model, values in sorted(end_to_end.items())
    ]
    return Latency(window_s=window_s, models=models)


def create_latency_router(ctx: ApiContext) -> APIRouter:
    """The ``/api/latency`` route bound to ``ctx``."""
    router = APIRouter(prefix="/api")

    @router.get(
        "/latency",
        response_model=Latency,
        tags=["operations"],
        summary="Per model: p50 / p95 seconds from last instance to results delivered, and per stage",
    )
    def latency(minutes: Annotated[int, Query(ge=1, le=1440)] = 60) -> Latency:
        return latency_by_model(ctx.catalog, window_s=minutes * 60.0)

    return router


__all__ = ["LATENCY_STAGES", "Latency", "create_latency_router", "latency_by_model", "percentile"]
