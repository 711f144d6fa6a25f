"""The worker's side of drift monitoring: one observation per finished job.

Called by ``workers.pipeline`` once a job's results are written.  The inputs are taken there,
from the headers and the volume the worker already has in memory: no extra read of the files,
nothing added to the listener's per-instance path, and every attribute of the header is at hand
(the listener keeps only the routing attributes).  A failure here is logged and never fails the
job: monitoring must not stop results from reaching the radiologist.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from dicom_node.catalog import Catalog, DatabaseError
from dicom_node.catalog.drift import record_observation
from dicom_node.drift.features import input_features, output_features, scanner_headers
from dicom_node.drift.scanners import scanner_identity
from dicom_node.settings import DriftSettings

if TYPE_CHECKING:
    from inference.prediction import Prediction
    from inference.volume import Volume

log = structlog.get_logger(__name__)


def capture_inputs(settings: DriftSettings, sources: Sequence[Any], volume: Volume) -> dict[str, Any] | None:
    """The job's scanner headers and input features, taken while the voxels are still loaded
    (the pipeline frees them before encoding); None when drift monitoring is off."""
    if not settings.enabled:
        return None
    try:
        return {"headers": scanner_headers(sources), "features": input_features(sources, volume)}
    except Exception as exc:  # monitoring never fails a job
        log.warning("drift_inputs_failed", error=type(exc).__name__)
        return None


def record_job(catalog: Catalog, settings: DriftSettings, *, job_id: int, model: str, series_instance_uid: str,
               inputs: Mapping[str, Any] | None, prediction: Prediction, volume: Volume,
               now: float | None = None) -> str | None:
    """Store the job's observation; return the scanner label it was counted under (None: not
    recorded)."""
    if inputs is None or not settings.enabled:
        return None
    now = time.time() if now is None else now
    try:
        features = {**inputs["features"], **output_features(prediction, volume)}
        series = catalog.get_series(series_instance_uid)
        seen_at = series.last_received_at if series is not None else now
        label = record_observation(
            catalog, model=model, series_instance_uid=series_instance_uid, job_id=job_id, at=now,
            seen_at=seen_at, scanner=scanner_identity(inputs["headers"]), features=features,
            max_scanners=settings.max_scanners)
    except (DatabaseError, ValueError, KeyError, TypeError) as exc:
        log.warning("drift_record_failed", job_id=job_id, model=model, error=type(exc).__name__)
        return None
    log.debug("drift_recorded", job_id=job_id, model=model, scanner=label)
    return label
