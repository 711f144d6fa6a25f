"""A series the model reads but the encoders cannot use fails its job once, naming the attribute.

Real parts: a SQLite catalog, phantom files spooled and recorded as the listener does, the real
loader, ``ct-tissue`` and the encoders, and the inference task of a real Celery app (called in
this process, as a worker calls it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dicom_node.catalog import Catalog, JobSpec, JobState
from dicom_node.catalog.recorder import instance_from_file
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.errors import PermanentError
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import BrokerSettings, DatabaseSettings, Settings, StorageSettings
from inference.registry import ModelRegistry
from tests.support.queues import MemoryQueue
from workers.app import INFERENCE_TASK, create_celery_app
from workers.pipeline import WorkerContext, run_inference
from workers.tasks import NodeTask

#: A PatientSex value highdicom refuses ("M", "F" or "O" are the only ones it takes).
BAD_SEX = "MALE"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[WorkerContext]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    settings = Settings(storage=StorageSettings(root=tmp_path / "spool"),
                        database=DatabaseSettings(url=catalog.url),
                        broker=BrokerSettings(url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"))
    yield WorkerContext(settings, catalog, ModelRegistry(torch.device("cpu")))
    catalog.close()


def _queued_job(ctx: WorkerContext, tmp_path: Path) -> int:
    phantom = make_chest_phantom(ChestSpec(slices=8))
    info = SeriesInfo(seed="bad-sex")
    datasets = slice_datasets(phantom.hu, phantom.affine, info)
    for ds in datasets:
        ds.PatientSex = BAD_SEX
    paths = write_datasets(datasets, tmp_path / "spool" / info.uid("study") / info.uid("series"))
    ctx.catalog.record_instances([instance_from_file(p, calling_ae_title="CT1") for p in paths])
    ctx.catalog.mark_series_complete(info.uid("series"), "idle")
    (job_id,) = ctx.catalog.create_jobs([JobSpec(info.uid("series"), "test", "ct-tissue", [], "normal")])
    queue_job(ctx.catalog, MemoryQueue(), job_id)
    return job_id


def test_encoder_refusal_is_permanent_and_names_the_attribute_not_its_value(
    ctx: WorkerContext, tmp_path: Path
) -> None:
    """run_inference raises PermanentError naming PatientSex, without the refused value."""
    job_id = _queued_job(ctx, tmp_path)
    job = ctx.catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,), count_attempt=True)
    with pytest.raises(PermanentError, match=r"the source images' attribute PatientSex cannot be used "
                                             r"\(ValueError in the SEG/SR encoder\)") as caught:
        run_inference(ctx, job)
    assert BAD_SEX not in str(caught.value)


def test_inference_task_fails_such_a_job_after_one_attempt(ctx: WorkerContext, tmp_path: Path) -> None:
    """The Celery task fails the job at its first attempt with that reason, not "model crashed"."""
    job_id = _queued_job(ctx, tmp_path)
    app = create_celery_app(ctx.settings, with_tasks=True)
    NodeTask._ctx = ctx
    try:
        outcome = app.tasks[INFERENCE_TASK](job_id)
    finally:
        NodeTask._ctx = None
    job = ctx.catalog.get_job(job_id)
    assert outcome == "failed"
    assert job is not None and job.state == JobState.FAILED.value and job.attempts == 1
    assert "PatientSex" in (job.reason or "")
    assert "model crashed" not in (job.reason or "") and BAD_SEX not in (job.reason or "")
