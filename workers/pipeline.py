"""The work of a job as plain functions: load → predict → encode → deliver.

Tasks (``workers.tasks``) only handle retries and state; everything here is callable and
testable without Celery.  With ``[worker] prefetch`` the series of the next job is loaded in the
background while the current job's model runs (``workers.prefetch``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from dicom_node.catalog import Catalog, JobRow, JobState
from dicom_node.errors import PermanentError
from dicom_node.ingest.spool import FileAccess, write_durably
from dicom_node.logs import remember_patients
from dicom_node.settings import Settings
from inference.registry import ModelRegistry
from inference.stacks import StackedVolume, predict_stacked
from workers.prefetch import Prefetcher

if TYPE_CHECKING:
    from dicom_node.imaging.loading import LoadedSeries

log = structlog.get_logger(__name__)


@dataclass
class WorkerContext:
    """Per-process resources of a worker: settings, catalog connection, loaded models."""

    settings: Settings
    catalog: Catalog
    registry: ModelRegistry
    #: Seconds per stage of the last job (``load_wait``, ``load``, ``predict``, ``encode``) and
    #: of the last delivery (``deliver``), for the log and the benchmarks.
    timings: dict[str, float] = field(default_factory=dict)
    #: Loads the next job's series in the background; None when ``[worker] prefetch`` is off
    #: (or ``auto`` on a CPU worker).
    prefetcher: Prefetcher | None = None


def build_context(settings: Settings) -> WorkerContext:
    """Create the catalog connection and the model registry on the configured device."""
    from inference.registry import select_device
    from inference.user_models import entry_point_factories

    device = select_device(settings.worker.device)
    registry = ModelRegistry(device)
    for name, factory in entry_point_factories().items():
        registry.register(name, factory)
    for spec in settings.models:
        registry.register(spec.name, spec.factory())
    catalog = Catalog(settings.database.url)
    prefetch = settings.worker.prefetch
    if prefetch == "auto":
        # On the CPU the files would be read on the cores the model computes on: no gain.
        prefetch = device.type != "cpu"
    prefetcher = Prefetcher(catalog, registry.names) if prefetch else None
    log.info("worker_context_ready", device=str(device), models=registry.names, prefetch=prefetch)
    return WorkerContext(settings, catalog, registry, prefetcher=prefetcher)


def _dataset_bytes(ds: Any) -> bytes:
    from io import BytesIO

    from dicom_node.dimse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


    buf = BytesIO()
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def load_job_series(ctx: WorkerContext, job: JobRow) -> tuple[LoadedSeries, dict[str, Any]]:
    """The job's series as a volume: the prefetched one when it is still exact, else loaded now.

    Returns the series and its load timings (``load_s``: wall time until the volume was in
    hand, ``load_wait_s``: of which waiting for the background prefetch, ``prefetched``).
    Raises ``SeriesError`` (permanent) for anything malformed; a prefetch that failed is loaded
    again here, so the job reports the real error.
    """
    from dicom_node.imaging.loading import load_series

    t0 = time.perf_counter()
    paths = ctx.catalog.series_paths(job.series_instance_uid)
    if not paths:
        raise PermanentError(f"series {job.series_instance_uid} has no stored instances")
    timings: dict[str, Any] = {"load_wait_s": 0.0, "prefetched": False}
    if ctx.prefetcher is not None:
        taken = ctx.prefetcher.take(job, paths)
        timings["load_wait_s"] = round(taken.wait_s, 3)
        if taken.loaded is not None:
            timings.update(prefetched=True, prefetch_load_s=round(taken.load_s, 3),
                           load_s=round(time.perf_counter() - t0, 3))
            return taken.loaded, timings
        if taken.reason != "not prefetched":
            log.info("prefetch_unused", job_id=job.id, reason=taken.reason)
    loaded = load_series(paths)
    timings["load_s"] = round(time.perf_counter() - t0, 3)
    return loaded, timings


def run_inference(ctx: WorkerContext, job: JobRow) -> dict[str, Any]:
    """Load the series, run the job's model, encode SEG + SR into the outbox.

    Raises ``dicom_node.PermanentError`` / ``inference.PermanentError`` for input the model
    cannot use, ``TransientError`` for conditions worth retrying.
    """
    from dicom_node.results import ResultOptions, encode_results
    from dicom_node.results.failures import ENCODING_INPUT_ERRORS, dicom_keywords, input_failure, raised_at
    from dicom_node.results.inputs import check_copied_attributes

    bound = log.bind(job_id=job.id, model=job.model, series_instance_uid=job.series_instance_uid)
    ctx.timings.clear()
    loaded, load_timings = load_job_series(ctx, job)
    if ctx.prefetcher is not None:
        # The next job's files are read while this job's model runs.
        ctx.prefetcher.start(job.id)
    volume, sources, frame_refs, excluded = loaded.volume, loaded.sources, loaded.frame_refs, loaded.excluded
    del loaded
    remember_patients(sources)
    check_copied_attributes(sources)
    t1 = time.perf_counter()
    model = ctx.registry.get(job.model)
    if model.modalities and volume.modality not in model.modalities:
        raise PermanentError(
            f"model {model.name} accepts {'/'.join(sorted(model.modalities))}, "
            f"but the series is {volume.modality or 'of unknown modality'}"
        )
    if isinstance(volume, StackedVolume):
        # Stacks of different spacing: the model runs on each, results join slice for slice.
        prediction = predict_stacked(model, volume)
    else:
        prediction = model.predict(volume)
    t2 = time.perf_counter()
    # The encoders read only the geometry: free the voxels (4 bytes each) before encoding
    # (``replace`` keeps a StackedVolume's per-stack geometry).
    volume = replace(volume, array=np.broadcast_to(np.float32(0.0), volume.shape))
    opts = ctx.settings.results
    try:
        encoded = encode_results(
            prediction, volume, sources, frame_refs,
            ResultOptions(seg_series_number=opts.seg_series_number, sr_series_number=opts.sr_series_number,
                          manufacturer=opts.manufacturer),
        )
    except ENCODING_INPUT_ERRORS as exc:
        # Deterministic: a retry fails the same way, so the job fails at once (permanent).
        failure = input_failure(exc)
        bound.error("encoding_failed", error_type=type(exc).__name__, keywords=dicom_keywords(exc),
                    where=raised_at(exc))
        raise failure from exc
    access = FileAccess.for_group(ctx.settings.storage.group)
    outdir = ctx.settings.outbox / f"job-{job.id}"
    ctx.settings.outbox.parent.mkdir(parents=True, exist_ok=True)
    for folder in (ctx.settings.outbox, outdir):
        with contextlib.suppress(FileExistsError):
            access.make_dir(folder)
    results: dict[str, Any] = {"segments": len(prediction.segments), "files": []}
    for role, ds in (("seg", encoded.seg), ("sr", encoded.sr)):
        if ds is None:
            continue
        path = outdir / f"{role}-{ds.SOPInstanceUID}.dcm"
        write_durably(path, [_dataset_bytes(ds)], access)
        results["files"].append(str(path))
        results[f"{role}_sop_instance_uid"] = str(ds.SOPInstanceUID)
        results[f"{role}_series_instance_uid"] = str(ds.SeriesInstanceUID)
    t3 = time.perf_counter()
    results["timings"] = {**load_timings, "inference_s": round(t2 - t1, 3), "encode_s": round(t3 - t2, 3)}
    ctx.timings.update(load_wait=float(load_timings["load_wait_s"]), load=float(load_timings["load_s"]),
                       predict=t2 - t1, encode=t3 - t2)
    results["excluded"] = [list(e) for e in excluded][:50]
    bound.info("job_encoded", segments=len(prediction.segments), **results["timings"])
    return results


def deliver(ctx: WorkerContext, job: JobRow) -> list[str]:
    """Send the job's result files to every destination not yet done.

    Returns the destinations that still failed transiently (empty: all done).  A permanent
    refusal raises ``PermanentError``.
    """
    t0 = time.perf_counter()
    try:
        return _deliver(ctx, job)
    finally:
        ctx.timings["deliver"] = time.perf_counter() - t0


def _deliver(ctx: WorkerContext, job: JobRow) -> list[str]:
    from dicom_node.delivery import send_files
    from dicom_node.errors import TransientError

    files = [Path(p) for p in job.results.get("files", [])]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise PermanentError(f"result files are gone from the outbox: {', '.join(missing)}")
    done = {d.destination for d in ctx.catalog.deliveries(job.id) if d.state == "done"}
    pending: list[str] = []
    for name in job.destinations:
        if name in done:
            continue
        try:
            dest = ctx.settings.destination(name)
        except KeyError:
            raise PermanentError(f"destination {name!r} is not configured any more") from None
        calling = dest.calling_ae_title or ctx.settings.listener.ae_title
        try:
            send_files(dest, files, calling_ae_title=calling)
        except TransientError as exc:
            ctx.catalog.record_delivery(job.id, name, ok=False, error=str(exc))
            log.warning("delivery_failed", job_id=job.id, destination=name, error=str(exc), transient=True)
            pending.append(f"{name}: {exc}")
            continue
        except PermanentError as exc:
            ctx.catalog.record_delivery(job.id, name, ok=False, error=str(exc))
            raise PermanentError(f"destination {name} refused the results: {exc}") from exc
        ctx.catalog.record_delivery(job.id, name, ok=True)
        log.info("results_sent", job_id=job.id, destination=name, files=len(files))
    return pending


__all__ = ["JobState", "WorkerContext", "build_context", "deliver", "load_job_series", "run_inference"]
