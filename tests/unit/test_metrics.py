"""Prometheus metrics: listener counters, catalog gauges, per-job histograms observed once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.catalog import Catalog, JobState
from dicom_node.catalog import heartbeats as heartbeat
from dicom_node.metrics import MAX_AE_LABELS, STAGES, NodeMetrics
from dicom_node.scheduling.jobs import queue_job
from dicom_node.web import create_app
from tests.support.queues import MemoryQueue
from tests.unit.test_web_api import (
    ROOT,
    TIMINGS,
    encode,
    fail_delivery,
    make_job,
    make_settings,
    receive_series,
    run_to_done,
)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield cat
    cat.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def test_listener_counters(catalog: Catalog) -> None:
    """instance_received, association and store_status show as labelled counters."""
    m = NodeMetrics(catalog)
    m.instance_received("CT1", 500_000)
    m.instance_received("CT1", 250_000)
    m.instance_received("MR1 ", 1000)  # DICOM pads AE titles with spaces
    m.association("CT1", "accepted")
    m.association("EVIL", "rejected")
    m.store_status(0x0000)
    m.store_status(0x0000)
    m.store_status(0xA700)
    parsed = samples(m.exposition().decode())
    assert value(parsed, "dicom_node_instances_received_total", calling_ae="CT1") == 2
    assert value(parsed, "dicom_node_instances_received_total", calling_ae="MR1") == 1
    assert value(parsed, "dicom_node_bytes_received_total", calling_ae="CT1") == 750_000
    assert value(parsed, "dicom_node_associations_total", calling_ae="EVIL", result="rejected") == 1
    assert value(parsed, "dicom_node_store_status_total", status="0x0000") == 2
    assert value(parsed, "dicom_node_store_status_total", status="0xA700") == 1


def test_ae_title_labels_are_capped(catalog: Catalog) -> None:
    """After MAX_AE_LABELS distinct calling AE titles, further ones are counted as 'other'."""
    m = NodeMetrics(catalog)
    for i in range(MAX_AE_LABELS + 10):
        m.instance_received(f"AE{i}", 1)
    parsed = samples(m.exposition().decode())
    names = {
        dict(k[1]).get("calling_ae")
        for k in parsed
        if k[0] == "dicom_node_instances_received_total"
    }
    assert len(names) == MAX_AE_LABELS + 1
    assert value(parsed, "dicom_node_instances_received_total", calling_ae="other") == 10


def test_registry_is_not_the_global_default(catalog: Catalog) -> None:
    """Two NodeMetrics coexist (own registries); nothing lands in the default REGISTRY."""
    a, b = NodeMetrics(catalog), NodeMetrics(catalog)
    a.instance_received("CT1", 1)
    assert "dicom_node_instances_received_total" not in {
        s.name for f in REGISTRY.collect() for s in f.samples
    }
    assert value(samples(b.exposition().decode()), "dicom_node_jobs", state="done") == 0


def test_metrics_after_jobs_went_through_all_states(tmp_path: Path, catalog: Catalog) -> None:
    """After two jobs reached done, /metrics has stage counts and one end-to-end sample per job."""
    queue = MemoryQueue()
    start = time.time() - 20.0
    receive_series(catalog, f"{ROOT}.1", f"{ROOT}.1.1", 3, start=start, step=1.0)
    receive_series(catalog, f"{ROOT}.2", f"{ROOT}.2.1", 5, start=start, step=2.0)
    done_a = make_job(catalog, f"{ROOT}.1.1", model="ct-tissue")
    done_b = make_job(catalog, f"{ROOT}.2.1", model="foreground")
    run_to_done(catalog, queue, done_a)
    run_to_done(catalog, queue, done_b)
    receive_series(catalog, f"{ROOT}.3", f"{ROOT}.3.1", 2, start=start)
    waiting = make_job(catalog, f"{ROOT}.3.1", priority="urgent")
    queue_job(catalog, queue, waiting)
    receive_series(catalog, f"{ROOT}.4", f"{ROOT}.4.1", 2, start=start)
    broken = make_job(catalog, f"{ROOT}.4.1", destinations=["archive"])
    fail_delivery(catalog, queue, broken, "archive", "connection refused")
    heartbeat.beat(catalog, "celery@gpu-01", 10, queues=["inference", "dispatch"], device="cpu")

    metrics = NodeMetrics(catalog, free_mb=lambda: 2048.0, min_free_mb=512)
    app = create_app(make_settings(tmp_path), catalog, queue, metrics=metrics)
    with TestClient(app) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        parsed = samples(r.text)
        again = samples(client.get("/metrics").text)  # a second scrape observes nothing new

    for stage in STAGES:
        assert value(parsed, "dicom_node_stage_seconds_count", stage=stage) == 2, stage
    assert value(parsed, "dicom_node_stage_seconds_sum", stage="receive") == pytest.approx(
        2.0 + 8.0
    )
    assert value(parsed, "dicom_node_stage_seconds_sum", stage="inference") == pytest.approx(
        2 * TIMINGS["inference_s"]
    )
    assert value(parsed, "dicom_node_end_to_end_seconds_count", model="ct-tissue") == 1
    assert value(parsed, "dicom_node_end_to_end_seconds_count", model="foreground") == 1
    # Job A's last instance came at start + 2 s, job B's at start + 8 s; both done just now.
    e2e_sum = sum(value(parsed, "dicom_node_end_to_end_seconds_sum", model=m) for m in ("ct-tissue", "foreground"))
    assert (20 - 2) + (20 - 8) <= e2e_sum < (20 - 2) + (20 - 8) + 10
    assert value(parsed, "dicom_node_end_to_end_seconds_bucket", le="+Inf", model="ct-tissue") == 1
    # Buckets from 0.5 s: job A (about 18 s) is above 15 s, below 30 s.
    assert value(parsed, "dicom_node_end_to_end_seconds_bucket", le="0.5", model="ct-tissue") == 0
    assert value(parsed, "dicom_node_inference_seconds_count", model="ct-tissue") == 1
    assert (
        value(parsed, "dicom_node_inference_seconds_sum", model="foreground")
        == TIMINGS["inference_s"]
    )
    assert again[("dicom_node_end_to_end_seconds_count", (("model", "ct-tissue"),))] == 1
    assert again[("dicom_node_stage_seconds_count", (("stage", "deliver"),))] == 2

    assert value(parsed, "dicom_node_jobs", state="done") == 2
    assert value(parsed, "dicom_node_jobs", state="queued") == 1
    assert value(parsed, "dicom_node_jobs", state="failed") == 1
    assert value(parsed, "dicom_node_queue_depth", queue="inference", priority="urgent") == 1
    assert value(parsed, "dicom_node_queue_depth", queue="inference", priority="normal") == 0
    assert value(parsed, "dicom_node_queue_oldest_age_seconds", queue="inference") >= 0
    assert value(parsed, "dicom_node_delivery_failures_total", destination="archive") == 1
    assert value(parsed, "dicom_node_workers_alive", queue="inference") == 1
    assert value(parsed, "dicom_node_spool_free_bytes") == 2048 * 1024 * 1024
    assert value(parsed, "dicom_node_spool_min_free_bytes") == 512 * 1024 * 1024


def test_each_job_is_observed_once(catalog: Catalog) -> None:
    """A job re-run after done is not observed again; a new job is observed on the next call."""
    queue = MemoryQueue()
    receive_series(catalog, f"{ROOT}.5", f"{ROOT}.5.1", 2, start=time.time() - 10)
    job_id = make_job(catalog, f"{ROOT}.5.1")
    run_to_done(catalog, queue, job_id)
    metrics = NodeMetrics(catalog)
    assert metrics.observe_finished_jobs() == 1
    assert metrics.observe_finished_jobs() == 0

    queue_job(catalog, queue, job_id, reason="re-run")  # done -> queued -> ... -> done again
    catalog.transition(job_id, JobState.RUNNING, count_attempt=True)
    catalog.transition(job_id, JobState.ENCODED)
    catalog.transition(job_id, JobState.DELIVERING)
    catalog.transition(job_id, JobState.DONE)
    assert metrics.observe_finished_jobs() == 0
    e2e = [s.value for s in metrics.end_to_end_seconds.collect()[0].samples
           if s.name == "dicom_node_end_to_end_seconds_count"]
    assert e2e == [1]

    receive_series(catalog, f"{ROOT}.6", f"{ROOT}.6.1", 2, start=time.time() - 10)
    other = make_job(catalog, f"{ROOT}.6.1")
    encode(catalog, queue, other)
    assert metrics.observe_finished_jobs() == 0  # encoded is not done
    catalog.transition(other, JobState.DELIVERING)
    catalog.transition(other, JobState.DONE)
    assert metrics.observe_finished_jobs() == 1


def test_skip_history_ignores_jobs_done_before_start(catalog: Catalog) -> None:
    """After skip_history, jobs finished before it are not replayed into the histograms."""
    queue = MemoryQueue()
    receive_series(catalog, f"{ROOT}.7", f"{ROOT}.7.1", 2, start=time.time() - 10)
    run_to_done(catalog, queue, make_job(catalog, f"{ROOT}.7.1"))
    metrics = NodeMetrics(catalog)
    metrics.skip_history(catalog)
    assert metrics.observe_finished_jobs() == 0
    receive_series(catalog, f"{ROOT}.8", f"{ROOT}.8.1", 2, start=time.time() - 10)
    run_to_done(catalog, queue, make_job(catalog, f"{ROOT}.8.1"))
    assert metrics.observe_finished_jobs() == 1


def test_observe_without_catalog_is_an_error() -> None:
    """observe_finished_jobs without any catalog raises a ValueError saying one is needed."""
    with pytest.raises(ValueError, match="needs a catalog"):
        NodeMetrics().observe_finished_jobs()
