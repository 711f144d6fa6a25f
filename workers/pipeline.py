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
from dicom_node.ingest.spool import DEFAULT_ACCESS, FileAccess, write_durably
from dicom_node.logs import remember_patients
from dicom_node.settings import Settings
from inference.gpu import PeakMemory
from inference.model import Model
from inference.registry import ModelRegistry
from inference.stacks import StackedVolume, predict_stacked
from workers.prefetch import Prefetcher

if TYPE_CHECKING:
    from dicom_node.imaging.loading import LoadedSeries
    from dicom_node.results.common import ResultOptions

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
    registry = ModelRegistry(device, max_warm=settings.worker.max_warm_models)
    for name, factory in entry_point_factories().items():
        registry.register(name, factory)
    for spec in settings.models:
        registry.register(spec.name, spec.factory(), device=spec.device)
    check_series_slots(settings, registry.names)
    catalog = Catalog(settings.database.url)
    prefetch = settings.worker.prefetch
    if prefetch == "auto":
        # On the CPU the files would be read on the cores the model computes on: no gain.
        prefetch = device.type != "cpu"
    prefetcher = Prefetcher(catalog, registry.names) if prefetch else None
    log.info("worker_context_ready", device=str(device), models=registry.names, prefetch=prefetch,
             max_warm_models=registry.max_warm)
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


def job_outputs(settings: Settings, job: JobRow) -> list[str]:
    """The output types the job encodes: the union of its destinations' ``outputs`` (SEG + SR,
    the canonical results, for a job with no destination: nothing is sent)."""
    from dicom_node.results.registry import output_names

    wanted: set[str] = set()
    for name in job.destinations:
        try:
            wanted.update(settings.destination(name).outputs)
        except KeyError:
            continue  # reported at delivery ("not configured any more")
    if not wanted:
        wanted.update(("seg", "sr"))
    return [n for n in output_names() if n in wanted]


def result_options(settings: Settings, model_name: str) -> ResultOptions:
    """Series numbers of ``model_name``'s results (its own block) and the equipment."""
    from dicom_node.results.common import ResultOptions, model_series_numbers, series_slot

    opts = settings.results
    slot = opts.model_series_slots.get(model_name) or series_slot(model_name)
    return ResultOptions(
        series_numbers=model_series_numbers(opts.series_number_base, slot),
        manufacturer=opts.manufacturer,
    )


def check_series_slots(settings: Settings, model_names: list[str]) -> None:
    """Raise ``ConfigError`` when two models would share Series Numbers."""
    from dicom_node.errors import ConfigError
    from dicom_node.results.common import series_slot

    seen: dict[int, str] = {}
    for name in sorted(model_names):
        slot = settings.results.model_series_slots.get(name) or series_slot(name)
        if slot in seen:
            raise ConfigError(
                f"models {seen[slot]!r} and {name!r} share series slot {slot}: give one another "
                f"slot in [results] model_series_slots"
            )
        seen[slot] = name


MANIFEST = "manifest.json"


def write_outputs(
    outdir: Path, encoded: dict[str, list[Any]], access: FileAccess = DEFAULT_ACCESS
) -> list[dict[str, str]]:
    """Write every dataset durably into ``outdir`` (made with ``access``, like the outbox) and
    add them to the manifest that says which output type each file is (delivery picks per
    destination from it); returns their entries."""
    import json

    outdir.parent.parent.mkdir(parents=True, exist_ok=True)
    for folder in (outdir.parent, outdir):
        with contextlib.suppress(FileExistsError):
            access.make_dir(folder)
    manifest: list[dict[str, str]] = []
    for output, datasets in encoded.items():
        for ds in datasets:
            path = outdir / f"{output}-{ds.SOPInstanceUID}.dcm"
            write_durably(path, [_dataset_bytes(ds)], access)
            manifest.append({
                "file": path.name,
                "output": output,
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
            })
    names = {m["file"] for m in manifest}
    kept = [m for m in read_manifest(outdir) if m["file"] not in names]
    write_durably(outdir / MANIFEST, [json.dumps({"files": kept + manifest}, indent=1).encode()], access)
    return manifest


def read_manifest(outdir: Path) -> list[dict[str, str]]:
    """The manifest of ``outdir`` (empty when there is none: jobs encoded before it existed)."""
    import json

    try:
        data = json.loads((outdir / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return list(data.get("files", []))


def run_inference(ctx: WorkerContext, job: JobRow) -> dict[str, Any]:
    """Load the series, run the job's model, encode its results into the outbox.

    The output types are the union of the job's destinations' ``outputs``; the outbox folder's
    ``manifest.json`` records each file's type.  When the model cannot be applied (a
    permanent refusal) and a destination asks for it, a "not applied" notice is encoded and
    sent before the error is raised again.

    Raises ``dicom_node.PermanentError`` / ``inference.PermanentError`` for input the model
    cannot use, ``TransientError`` for conditions worth retrying.
    """
    import inference

    try:
        return _run_inference(ctx, job)
    except (PermanentError, inference.PermanentError) as exc:
        notify_not_applied(ctx, job, str(exc))
        raise


def _run_inference(ctx: WorkerContext, job: JobRow) -> dict[str, Any]:
    from dicom_node.drift.record import capture_inputs, record_job
    from dicom_node.results import encode_outputs, rendered_slices
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
    model, warm = get_model(ctx, job.model)
    if model.modalities and volume.modality not in model.modalities:
        raise PermanentError(
            f"model {model.name} accepts {'/'.join(sorted(model.modalities))}, "
            f"but the series is {volume.modality or 'of unknown modality'}"
        )
    t_model = time.perf_counter()
    with PeakMemory.measure(ctx.registry.device_for(job.model)) as peak:
        if isinstance(volume, StackedVolume):
            # Stacks of different spacing: the model runs on each, results join slice for slice.
            prediction = predict_stacked(model, volume)
        else:
            prediction = model.predict(volume)
    t2 = time.perf_counter()
    # Drift inputs (headers, noise) while the voxels are still here: they are freed below.
    drift_inputs = capture_inputs(ctx.settings.drift, sources, volume)
    outputs = job_outputs(ctx.settings, job)
    # The encoders read only the geometry and the slices the images draw: keep those and free
    # the other voxels (4 bytes each) before encoding (``replace`` keeps a StackedVolume's
    # per-stack geometry).
    pixels = {k: np.array(volume.array[k]) for k in rendered_slices(prediction, outputs)}
    volume = replace(volume, array=np.broadcast_to(np.float32(0.0), volume.shape))
    try:
        encoded = encode_outputs(prediction, volume, sources, frame_refs, outputs,
                                 result_options(ctx.settings, prediction.model_name), pixels=pixels)
    except ENCODING_INPUT_ERRORS as exc:
        # Deterministic: a retry fails the same way, so the job fails at once (permanent).
        failure = input_failure(exc)
        bound.error("encoding_failed", error_type=type(exc).__name__, keywords=dicom_keywords(exc),
                    where=raised_at(exc))
        raise failure from exc
    access = FileAccess.for_group(ctx.settings.storage.group)
    outdir = ctx.settings.outbox / f"job-{job.id}"
    manifest = write_outputs(outdir, encoded, access)
    results: dict[str, Any] = {"segments": len(prediction.segments),
                               "files": [str(outdir / m["file"]) for m in manifest],
                               "outputs": {n: len(d) for n, d in encoded.items()}}
    kept = keep_prediction(ctx, job, prediction, volume, outdir, access)
    if kept is not None:
        results["prediction"] = str(kept)
    for role in ("seg", "sr"):
        for ds in encoded.get(role, [])[:1]:
            results[f"{role}_sop_instance_uid"] = str(ds.SOPInstanceUID)
            results[f"{role}_series_instance_uid"] = str(ds.SeriesInstanceUID)
    t3 = time.perf_counter()
    results["timings"] = {**load_timings, "inference_s": round(t2 - t1, 3), "encode_s": round(t3 - t2, 3),
                          "model_load_s": round(t_model - t1, 3)}
    # Warm: the model was in memory when the job came; cold: inference_s includes loading it.
    results["model_warm"] = warm
    results["memory"] = peak.as_dict()
    ctx.timings.update(load_wait=float(load_timings["load_wait_s"]), load=float(load_timings["load_s"]),
                       predict=t2 - t1, encode=t3 - t2)
    results["excluded"] = [list(e) for e in excluded][:50]
    record_job(ctx.catalog, ctx.settings.drift, job_id=job.id, model=job.model,
               series_instance_uid=job.series_instance_uid, inputs=drift_inputs, prediction=prediction, volume=volume)
    bound.info("job_encoded", segments=len(prediction.segments), outputs=results["outputs"],
               model_warm=warm, peak_memory_mib=results["memory"]["peak_mib"],
               memory_kind=results["memory"]["kind"], **results["timings"])
    return results


def get_model(ctx: WorkerContext, name: str) -> tuple[Model, bool]:
    """The job's model from the process's warm models, and whether it was warm; a cold one is
    loaded (evicting the least recently used beyond ``[worker] max_warm_models``) and logged."""
    registry = ctx.registry
    warm = registry.is_warm(name)
    evicted = len(registry.evicted)
    model = registry.get(name)
    if not warm:
        for gone in registry.evicted[evicted:]:
            log.info("model_evicted", model=gone, max_warm_models=registry.max_warm)
        log.info("model_loaded", model=name, device=str(registry.device_for(name)),
                 warm=[w.name for w in registry.warm()])
    return model, warm


def keep_prediction(ctx: WorkerContext, job: JobRow, prediction: Any, volume: Any, outdir: Path,
                    access: FileAccess) -> Path | None:
    """Save the prediction (``prediction.npz``) of a shadow job, or of a live job with a shadow
    job on the same series, for their comparison (``dicom_node.shadow``); None otherwise.

    Not listed in the manifest nor in ``files``: it is never sent anywhere.
    """
    from dicom_node.catalog.shadow import has_shadow_sibling
    from dicom_node.results.agreement import PREDICTION_FILE, prediction_archive

    if not (job.shadow or has_shadow_sibling(ctx.catalog, job)):
        return None
    path = outdir / PREDICTION_FILE
    write_durably(path, [prediction_archive(prediction, volume)], access)
    return path


def notify_not_applied(ctx: WorkerContext, job: JobRow, reason: str) -> list[str]:
    """Encode "<model> was not applied: <reason>" and send it to the job's destinations that
    ask for it (``notify_not_applied``); best effort, once: a failure is logged, not retried.

    Returns the destinations that received it.
    """
    from dicom_node.delivery import send_files
    from dicom_node.errors import DicomNodeError
    from dicom_node.results.notice import Notice, encode_notice, source_headers

    bound = log.bind(job_id=job.id, model=job.model, series_instance_uid=job.series_instance_uid)
    targets = []
    for name in job.destinations:
        try:
            dest = ctx.settings.destination(name)
        except KeyError:
            continue
        if dest.notify_not_applied:
            targets.append(dest)
    if not targets:
        return []
    try:
        headers = source_headers(ctx.catalog.series_paths(job.series_instance_uid))
        if not headers:
            bound.warning("notice_skipped", why="no readable source header")
            return []
        version = ""
        try:
            version = str(ctx.registry.get(job.model).version)
        except Exception:  # the model may be what failed: the notice then says "unknown"
            version = ""
        notice = Notice(job.model, version, reason)
        with_sc = any("sc" in d.outputs for d in targets)
        datasets = encode_notice(notice, headers, result_options(ctx.settings, job.model), with_sc=with_sc)
        outdir = ctx.settings.outbox / f"job-{job.id}"
        by_kind = {"notice-sr": [d for d in datasets if d.Modality == "SR"],
                   "notice-sc": [d for d in datasets if d.Modality != "SR"]}
        access = FileAccess.for_group(ctx.settings.storage.group)
        manifest = write_outputs(outdir, {k: v for k, v in by_kind.items() if v}, access)
    except (DicomNodeError, OSError, ValueError) as exc:
        bound.warning("notice_failed", error=type(exc).__name__)
        return []
    sent = []
    for dest in targets:
        files = [outdir / m["file"] for m in manifest
                 if m["output"] == "notice-sr" or (m["output"] == "notice-sc" and "sc" in dest.outputs)]
        try:
            send_files(dest, files, calling_ae_title=dest.calling_ae_title or ctx.settings.listener.ae_title)
        except DicomNodeError as exc:
            bound.warning("notice_not_sent", destination=dest.name, error=str(exc))
            continue
        sent.append(dest.name)
        bound.info("notice_sent", destination=dest.name, files=len(files))
    return sent


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
    # Which output type each file is: a destination gets only its ``outputs`` (a job encoded
    # before manifests existed sends everything).
    kinds: dict[str, str] = {}
    for p in {f.parent for f in files}:
        kinds.update({str(p / m["file"]): m["output"] for m in read_manifest(p)})
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
        mine = [f for f in files if kinds.get(str(f), "") in dest.outputs or str(f) not in kinds]
        try:
            report = send_files(dest, mine, calling_ae_title=calling)
        except TransientError as exc:
            ctx.catalog.record_delivery(job.id, name, ok=False, error=str(exc))
            log.warning("delivery_failed", job_id=job.id, destination=name, error=str(exc), transient=True)
            pending.append(f"{name}: {exc}")
            continue
        except PermanentError as exc:
            ctx.catalog.record_delivery(job.id, name, ok=False, error=str(exc))
            raise PermanentError(f"destination {name} refused the results: {exc}") from exc
        # A class the destination refused at negotiation is recorded per object, not a failure.
        if dest.commitment == "storage-commitment":
            from dicom_node.scheduling.commitment import start_transaction

            # Recorded with its transaction, then the N-ACTION; the node's commitment loop
            # applies the archive's report (docs/architecture.md, "What done means").
            start_transaction(ctx.catalog, job.id, dest, report, report.records(), calling_ae_title=calling)
        else:
            objects = report.records() if dest.commitment == "none" else _confirmed(dest, report, calling)
            ctx.catalog.record_delivery(job.id, name, ok=True, objects=objects)
        log.info("results_sent", job_id=job.id, destination=name, files=report.sent,
                 refused=[r.refused for r in report.refused])
        if job.generation > 1:
            _check_overwrite(ctx, job, dest, report, calling)
    return pending


def _check_overwrite(ctx: WorkerContext, job: JobRow, dest: Any, report: Any, calling: str) -> None:
    """A re-run sent objects this destination already had (same SOP Instance UIDs, new content):
    ask which version it holds (C-FIND, or QIDO-RS for a DICOMweb destination).  An archive that
    kept the first is warned about once (log, job event, ``destination_findings`` row behind the
    metric, ``/readyz`` and the dashboard); one seen replacing them clears the finding.  Never
    fails the delivery."""
    from dicom_node.catalog import queries
    from dicom_node.catalog.tables import KEEPS_FIRST_INSTANCE
    from dicom_node.delivery import check_overwrite
    from dicom_node.delivery.report import KEEPS_FIRST_FIX

    again = queries.delivered_before(ctx.catalog, job, dest.name)
    paths = [r.path for r in report.results if r.refused is None and r.sop_instance_uid in again]
    if not paths:
        return
    if dest.commitment != "find":  # _confirmed waited already
        time.sleep(dest.find_delay_seconds)
    try:
        checks = check_overwrite(dest, paths, calling_ae_title=calling)
    except Exception as exc:  # a check, never a reason to fail a delivered job
        log.warning("overwrite_check_failed", job_id=job.id, destination=dest.name, error=str(exc))
        return
    kept = [c for c in checks if c.replaced is False]
    if kept:
        detail = (f"destination {dest.name} keeps the first object of a SOP Instance UID: after job {job.id} "
                  f"(generation {job.generation}) {kept[0].detail}, so corrected re-runs do not show there; "
                  f"fix: {KEEPS_FIRST_FIX}")
        if ctx.catalog.record_destination_finding(dest.name, KEEPS_FIRST_INSTANCE, detail, job_id=job.id):
            log.warning("destination_keeps_first_instance", job_id=job.id, destination=dest.name,
                        objects=len(kept), detail=detail)
    elif any(c.replaced for c in checks):
        if ctx.catalog.clear_destination_finding(dest.name, KEEPS_FIRST_INSTANCE):
            log.info("destination_replaces_instances", job_id=job.id, destination=dest.name)
    else:
        log.info("overwrite_check_unknown", job_id=job.id, destination=dest.name, detail=checks[0].detail)


def _confirmed(dest: Any, report: Any, calling: str) -> list[dict[str, Any]]:
    """``commitment = "find"``: after ``find_delay_seconds``, C-FIND each sent object; its record
    becomes ``confirmed``, or ``unconfirmed`` with the reason (the delivery itself stays done)."""
    from dicom_node.delivery.confirm import confirm_by_find

    sent = [r for r in report.results if r.refused is None]
    stored_at = time.time()
    time.sleep(dest.find_delay_seconds)
    found = {c.sop_instance_uid: c for c in confirm_by_find(dest, [r.path for r in sent], calling_ae_title=calling)}
    # Time from the C-STORE success to the C-FIND answer (dicom_node_delivery_confirmation_seconds).
    seconds = round(time.time() - stored_at, 3)
    records = []
    for result in report.results:
        record = result.record()
        check = found.get(result.sop_instance_uid)
        if check is not None:
            record["outcome"] = "confirmed" if check.confirmed else "unconfirmed"
            record["detail"] = check.reason if not check.confirmed else record["detail"]
            if check.confirmed:
                record["confirmation_seconds"] = seconds
            if not check.confirmed:
                log.warning("delivery_unconfirmed", destination=dest.name,
                            sop_instance_uid=result.sop_instance_uid, reason=check.reason)
        records.append(record)
    return records


__all__ = ["JobState", "WorkerContext", "build_context", "deliver", "load_job_series", "run_inference"]
