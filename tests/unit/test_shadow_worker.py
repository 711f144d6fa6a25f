"""Shadow jobs through the real Celery tasks in process: inference encodes and keeps the
prediction, dispatch finishes the job without sending, the comparison with the live job of the
series is stored; resend refuses a shadow job and a retry sends nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dicom_node.catalog import Catalog, CatalogError, JobSpec, JobState
from dicom_node.catalog import shadow as store
from dicom_node.catalog.recorder import instance_from_file
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.scheduling import operator
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import (
    BrokerSettings,
    DatabaseSettings,
    DestinationSettings,
    RuleSettings,
    Settings,
    StorageSettings,
)
from inference.registry import ModelRegistry
from tests.support.queues import MemoryQueue
from workers.app import DISPATCH_TASK, INFERENCE_TASK, create_celery_app
from workers.pipeline import WorkerContext
from workers.tasks import NodeTask


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[WorkerContext]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    settings = Settings(
        storage=StorageSettings(root=tmp_path / "spool"), database=DatabaseSettings(url=catalog.url),
        broker=BrokerSettings(url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"),
        destinations=[DestinationSettings(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=9)],
        rules=[RuleSettings(name="trial", models=["ct-tissue"], destinations=["archive"], mode="shadow")],
    )
    NodeTask._ctx = WorkerContext(settings, catalog, ModelRegistry(torch.device("cpu")))
    try:
        yield NodeTask._ctx
    finally:
        NodeTask._ctx = None
        catalog.close()


def test_shadow_job_runs_is_kept_never_sent_and_is_compared(ctx: WorkerContext, tmp_path: Path) -> None:
    phantom = make_chest_phantom(ChestSpec(rows=48, columns=48, slices=8, pixel_spacing=7.0))
    info = SeriesInfo(seed="shadow-worker")
    paths = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "in")
    catalog = ctx.catalog
    catalog.record_instances([instance_from_file(p, calling_ae_title="CT1") for p in paths])
    series = info.uid("series")
    catalog.mark_series_complete(series, "idle")
    # The shadow rule names a destination (port 9: nothing listens): it must never be tried.
    catalog.create_jobs([JobSpec(series, "trial", "ct-tissue", ["archive"], "normal", "shadow"),
                         JobSpec(series, "live", "foreground", [], "normal")])
    ids = {j.model: j.id for j in catalog.list_jobs()}
    shadow_id, live_id = ids["ct-tissue"], ids["foreground"]
    app = create_celery_app(ctx.settings, with_tasks=True)
    for job_id in (shadow_id, live_id):
        queue_job(catalog, MemoryQueue(), job_id)
        assert app.tasks[INFERENCE_TASK](job_id) == "encoded"
        assert app.tasks[DISPATCH_TASK](job_id) == "done"
    shadow, live = catalog.get_job(shadow_id), catalog.get_job(live_id)
    assert shadow is not None and live is not None
    assert shadow.state_label == "done (shadow)" and shadow.destinations == [] and catalog.deliveries(shadow_id) == []
    assert [e.state for e in catalog.job_events(shadow_id)][-2:] == ["encoded", "done"]  # no delivering
    assert Path(shadow.results["prediction"]).exists() and Path(live.results["prediction"]).exists()
    assert all(Path(f).exists() for f in shadow.results["files"])
    (row,) = store.comparisons(catalog)
    assert (row.shadow_model, row.live_model, row.basis) == ("ct-tissue", "foreground", "labels")
    assert set(row.detail["dice_per_label"]) == {"body"} and row.dice is not None and row.dice > 0.9

    # An operator cannot send a shadow job's results; a retry finishes it again, sending nothing.
    with pytest.raises(CatalogError, match="shadow job"):
        operator.resend(catalog, MemoryQueue(), ctx.settings, str(shadow_id), by="test")
    queue = MemoryQueue()
    operator.retry_job(catalog, queue, shadow_id, reason="test")
    assert app.tasks[DISPATCH_TASK](shadow_id) == "done"
    assert catalog.deliveries(shadow_id) == [] and catalog.get_job(shadow_id).state == JobState.DONE.value  # type: ignore[union-attr]
    assert len(store.comparisons(catalog)) == 1  # compared once
