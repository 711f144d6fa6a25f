"""``/api/latency``: per model p50 / p95 end to end (and per stage) over the last hour, equal to
what the catalog's own timestamps give when recomputed here with numpy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from dicom_node.catalog import Catalog, InstanceRow, JobRow, JobState
from dicom_node.scheduling.jobs import queue_job
from dicom_node.web import create_app
from dicom_node.web.latency import percentile
from tests.support.queues import MemoryQueue
from tests.unit.test_web_api import ROOT, TIMINGS, make_job, make_settings, receive_series, run_to_done


def catalog_end_to_end(catalog: Catalog, model: str, since: float) -> list[float]:
    """done_at - last instance, straight from the tables, for the model's jobs done since."""
    with catalog.session() as s:
        jobs = s.scalars(select(JobRow).where(JobRow.model == model, JobRow.state == "done",
                                              JobRow.done_at >= since)).all()
        out = []
        for job in jobs:
            last = s.scalar(select(func.max(InstanceRow.received_at))
                            .where(InstanceRow.series_instance_uid == job.series_instance_uid))
            assert job.done_at is not None and last is not None
            out.append(job.done_at - last)
        return out


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [0.5, 9.0, 2.0, 4.0, 1.5], list(np.arange(20.0) ** 1.5)])
def test_percentile_is_numpys_linear(values: list[float]) -> None:
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_latency_per_model_matches_the_catalog(tmp_path: Path) -> None:
    """Five ct-tissue jobs and two foreground jobs done; one older than the hour and one re-run
    after done are left out; the API's figures are numpy's over the catalog's times."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    queue = MemoryQueue()
    now = time.time()
    ids: dict[str, list[int]] = {"ct-tissue": [], "foreground": []}
    for k, (model, ago) in enumerate([("ct-tissue", 3.0), ("ct-tissue", 7.0), ("ct-tissue", 12.0),
                                      ("ct-tissue", 30.0), ("ct-tissue", 95.0), ("foreground", 4.0),
                                      ("foreground", 40.0)]):
        receive_series(catalog, f"{ROOT}.{k}", f"{ROOT}.{k}.1", 3, start=now - ago - 2.0)
        job = make_job(catalog, f"{ROOT}.{k}.1", model=model)
        run_to_done(catalog, queue, job)
        ids[model].append(job)
    # Delivered two hours ago: outside the window.
    receive_series(catalog, f"{ROOT}.50", f"{ROOT}.50.1", 3, start=now - 7300)
    old = make_job(catalog, f"{ROOT}.50.1")
    run_to_done(catalog, queue, old)
    with catalog.session() as s:
        s.execute(update(JobRow).where(JobRow.id == old).values(done_at=now - 7200))
    # Re-run after done: its second delivery is an operator's action, not counted.
    receive_series(catalog, f"{ROOT}.51", f"{ROOT}.51.1", 3, start=now - 500)
    rerun = make_job(catalog, f"{ROOT}.51.1")
    run_to_done(catalog, queue, rerun)
    queue_job(catalog, queue, rerun, reason="re-run")
    for state in (JobState.RUNNING, JobState.ENCODED, JobState.DELIVERING, JobState.DONE):
        catalog.transition(rerun, state)

    app = create_app(make_settings(tmp_path), catalog, queue)
    with TestClient(app) as client:
        got = client.get("/api/latency").json()
        dashboard = client.get("/").text
    since = time.time() - 3600
    assert got["window_s"] == 3600.0
    by_model = {m["model"]: m for m in got["models"]}
    assert sorted(by_model) == ["ct-tissue", "foreground"]
    for model, jobs in ids.items():
        expected = catalog_end_to_end(catalog, model, since)
        if model == "ct-tissue":
            expected = [v for v in expected if v < 400]  # the re-run (received 500 s ago) is out
        assert by_model[model]["jobs"] == len(jobs) == len(expected)
        p50, p95 = np.percentile(expected, [50, 95])
        assert by_model[model]["end_to_end"] == {"p50_s": round(p50, 3), "p95_s": round(p95, 3)}
        assert by_model[model]["stages"]["inference"] == {"p50_s": TIMINGS["inference_s"],
                                                           "p95_s": TIMINGS["inference_s"]}
        assert set(by_model[model]["stages"]) == {"complete", "queued", "load", "inference", "encode", "deliver"}
    assert 'id="latency-table"' in dashboard and "latency.js" in dashboard
    catalog.close()


def test_latency_is_empty_without_deliveries(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with TestClient(create_app(make_settings(tmp_path), catalog, MemoryQueue())) as client:
        assert client.get("/api/latency?minutes=5").json() == {"window_s": 300.0, "models": []}
    catalog.close()
