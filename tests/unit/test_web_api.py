"""REST API, readiness and pages over a real SQLite catalog filled through the Catalog API."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicom_node.catalog import Catalog, JobSpec, JobState
from dicom_node.catalog import heartbeats as heartbeat
from dicom_node.ingest.events import StoredInstance
from dicom_node.metrics import NodeMetrics
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import DestinationSettings, Settings, load_settings
from dicom_node.web import create_app, readiness_checks
from tests.support.queues import MemoryQueue

TOKEN = "s3cret-token"  # noqa: S105 - a test token, not a credential
ROOT = "1.2.826.0.1.3680043.8.498"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TIMINGS = {"load_s": 0.8, "inference_s": 2.5, "encode_s": 0.4}


def make_settings(tmp_path: Path, *, token: str | None = TOKEN) -> Settings:
    """Settings with two destinations and, unless ``token`` is None, an API token."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "node.toml"
    token_line = f'api_token = "{token}"' if token else ""
    cfg.write_text(f"""
[web]
{token_line}
[storage]
min_free_mb = 100
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 4242
[[destinations]]
name = "viewer"
ae_title = "VIEWER"
host = "127.0.0.1"
port = 4243
""")
    return load_settings(cfg)


def receive_series(
    catalog: Catalog,
    study: str,
    series: str,
    n: int = 3,
    *,
    start: float,
    step: float = 1.0,
    modality: str = "CT",
    study_date: str | None = None,
) -> None:
    """Record ``n`` instances of one series, received ``step`` seconds apart from ``start``."""
    dated = {"StudyDate": study_date} if study_date else {}
    catalog.record_instances(
        [
            StoredInstance(
                study,
                series,
                f"{series}.{i}",
                CT_IMAGE,
                EXPLICIT_LE,
                Path(f"/spool/{series}/{i}.dcm"),
                1000,
                "CT1",
                "assoc-1",
                start + i * step,
                {"Modality": modality, "InstanceNumber": i + 1, **dated},
            )
            for i in range(n)
        ]
    )


def make_job(
    catalog: Catalog,
    series: str,
    *,
    model: str = "ct-tissue",
    priority: str = "normal",
    destinations: Sequence[str] = ("archive",),
) -> int:
    """Complete the series and create one job for it (state ``received``)."""
    catalog.mark_series_complete(series, "idle")
    (job_id,) = catalog.create_jobs(
        [JobSpec(series, "ct-rule", model, list(destinations), priority)]
    )
    return job_id


def encode(catalog: Catalog, queue: MemoryQueue, job_id: int) -> None:
    """received -> queued -> running -> encoded, with worker timings in the results."""
    queue_job(catalog, queue, job_id)
    catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,), count_attempt=True)
    catalog.set_results(
        job_id,
        {
            "timings": dict(TIMINGS),
            "files": ["/outbox/seg.dcm", "/outbox/sr.dcm"],
            "seg_sop_instance_uid": f"{ROOT}.9.1",
            "sr_sop_instance_uid": f"{ROOT}.9.2",
        },
    )
    catalog.transition(job_id, JobState.ENCODED)


def deliver(catalog: Catalog, job_id: int) -> None:
    """encoded -> delivering -> done, every destination delivered at the first attempt."""
    catalog.transition(job_id, JobState.DELIVERING)
    job = catalog.get_job(job_id)
    assert job is not None
    for dest in job.destinations:
        catalog.record_delivery(job_id, dest, ok=True)
    catalog.transition(job_id, JobState.DONE)


def run_to_done(catalog: Catalog, queue: MemoryQueue, job_id: int) -> None:
    """Drive a job through every state to ``done``."""
    encode(catalog, queue, job_id)
    deliver(catalog, job_id)


def fail_delivery(
    catalog: Catalog, queue: MemoryQueue, job_id: int, destination: str, error: str
) -> None:
    """Encode a job, then fail its delivery to ``destination`` (job ends ``failed``)."""
    encode(catalog, queue, job_id)
    catalog.transition(job_id, JobState.DELIVERING)
    catalog.record_delivery(job_id, destination, ok=False, error=error)
    catalog.transition(
        job_id, JobState.FAILED, reason=f"delivery failed after 1 attempts: {destination}: {error}"
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield cat
    cat.close()


@pytest.fixture
def queue() -> MemoryQueue:
    return MemoryQueue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings, catalog: Catalog, queue: MemoryQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings, catalog, queue)) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_job_moving_through_all_states_is_visible(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """Each transition shows in GET /api/jobs/{id}; a done job has timeline, stages, deliveries."""
    start = time.time() - 10.0
    receive_series(
        catalog, f"{ROOT}.1", f"{ROOT}.1.1", 3, start=start, step=1.0
    )  # last at start + 2 s
    job_id = make_job(catalog, f"{ROOT}.1.1", destinations=["archive", "viewer"])

    def state() -> str:
        r = client.get(f"/api/jobs/{job_id}")
        assert r.status_code == 200
        return str(r.json()["state"])

    assert state() == "received"
    queue_job(catalog, queue, job_id)
    assert state() == "queued" and queue.inference == [(job_id, "normal")]
    catalog.transition(job_id, JobState.RUNNING, count_attempt=True)
    assert state() == "running"
    catalog.set_results(
        job_id,
        {
            "timings": dict(TIMINGS),
            "files": ["/outbox/a.dcm", "/outbox/b.dcm"],
            "seg_sop_instance_uid": f"{ROOT}.9.1",
        },
    )
    catalog.transition(job_id, JobState.ENCODED)
    assert state() == "encoded"
    catalog.transition(job_id, JobState.DELIVERING)
    assert state() == "delivering"
    catalog.record_delivery(job_id, "archive", ok=True)
    catalog.record_delivery(job_id, "viewer", ok=False, error="association rejected")
    catalog.record_delivery(job_id, "viewer", ok=True)
    catalog.transition(job_id, JobState.DONE)
    finished = time.time()

    detail = client.get(f"/api/jobs/{job_id}").json()
    assert detail["state"] == "done" and detail["actions"] == ["retry"]
    assert [e["state"] for e in detail["events"]] == [
        "received",
        "queued",
        "running",
        "encoded",
        "delivering",
        "done",
    ]
    assert detail["events"][0]["detail"] == "rule ct-rule"
    assert detail["stages"]["receive"] == pytest.approx(2.0)
    assert detail["stages"]["load"] == 0.8 and detail["stages"]["inference"] == 2.5
    assert detail["stages"]["encode"] == 0.4
    assert 0 <= detail["stages"]["queued"] < 5 and 0 <= detail["stages"]["deliver"] < 5
    assert detail["stages"]["complete"] == pytest.approx(8.0, abs=2.0)
    # Last instance at start + 2 s, i.e. ~8 s before now.
    assert 8.0 <= detail["end_to_end_s"] <= finished - start - 2.0 + 0.01
    deliveries = {d["destination"]: d for d in detail["deliveries"]}
    assert deliveries["archive"]["attempts"] == 1 and deliveries["archive"]["state"] == "done"
    assert (
        deliveries["viewer"]["attempts"] == 2
        and deliveries["viewer"]["last_error"] == "association rejected"
    )
    assert detail["results"] == {
        "timings": TIMINGS,
        "seg_sop_instance_uid": f"{ROOT}.9.1",
        "file_count": 2,
        "excluded_count": 0,
    }


def test_list_jobs_filters_by_state_and_limit(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """GET /api/jobs: newest first, filtered by state, limited, unknown states rejected."""
    now = time.time()
    ids = []
    for i in range(3):
        receive_series(catalog, f"{ROOT}.2", f"{ROOT}.2.{i}", 2, start=now - 60)
        ids.append(make_job(catalog, f"{ROOT}.2.{i}"))
    run_to_done(catalog, queue, ids[0])
    queue_job(catalog, queue, ids[1])

    all_jobs = client.get("/api/jobs").json()
    assert [j["id"] for j in all_jobs] == ids[::-1]
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "done"}).json()] == [ids[0]]
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "queued"}).json()] == [ids[1]]
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "received"}).json()] == [
        ids[2]
    ]
    assert len(client.get("/api/jobs", params={"limit": 2}).json()) == 2
    assert client.get("/api/jobs", params={"state": "exploded"}).status_code == 422
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 422
    done = all_jobs[2]
    assert done["modality"] == "CT" and done["rule"] == "ct-rule" and done["model"] == "ct-tissue"
    assert done["age_s"] >= 0 and done["stages"]["inference"] == 2.5 and done["end_to_end_s"] > 0


def test_unknown_job_is_404(client: TestClient) -> None:
    """A job id that does not exist answers 404 with a sentence naming it, for reads and actions."""
    r = client.get("/api/jobs/4711")
    assert r.status_code == 404 and r.json()["detail"] == "job 4711 not found"
    assert client.post("/api/jobs/4711/retry", headers=AUTH).status_code == 404
    assert client.post("/api/jobs/4711/cancel", headers=AUTH).status_code == 404
    assert client.get("/jobs/4711").status_code == 404


def test_mutating_calls_refused_without_configured_token(
    tmp_path: Path, catalog: Catalog, queue: MemoryQueue
) -> None:
    """With no web.api_token, retry and cancel answer 403 saying how to configure one."""
    receive_series(catalog, f"{ROOT}.3", f"{ROOT}.3.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.3.1")
    app = create_app(make_settings(tmp_path, token=None), catalog, queue)
    with TestClient(app) as c:
        for action in ("retry", "cancel"):
            r = c.post(f"/api/jobs/{job_id}/{action}", headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403
            assert (
                "set [web] api_token" in r.json()["detail"]
                and "DICOM_NODE_WEB__API_TOKEN" in r.json()["detail"]
            )
    job = catalog.get_job(job_id)
    assert job is not None and job.state == "received" and queue.inference == []


def test_missing_or_wrong_token_is_401(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """A missing header, another scheme or a wrong token answers 401 and changes nothing."""
    receive_series(catalog, f"{ROOT}.4", f"{ROOT}.4.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.4.1")
    catalog.transition(job_id, JobState.FAILED, reason="model crashed: RuntimeError: boom")
    for headers in (
        {},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
    ):
        r = client.post(f"/api/jobs/{job_id}/retry", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert (
        client.post(f"/api/jobs/{job_id}/retry", headers={"Authorization": "Bearer wrong"}).json()[
            "detail"
        ]
        == "the API token is wrong"
    )
    job = catalog.get_job(job_id)
    assert job is not None and job.state == "failed" and queue.inference == []


def test_retry_failed_job_requeues_it(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """Retrying a job that failed in inference puts it back to queued and on the inference queue."""
    receive_series(catalog, f"{ROOT}.5", f"{ROOT}.5.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.5.1", priority="urgent")
    queue_job(catalog, queue, job_id)
    catalog.transition(job_id, JobState.RUNNING, count_attempt=True)
    catalog.transition(job_id, JobState.FAILED, reason="model crashed: RuntimeError: boom")
    assert client.get(f"/api/jobs/{job_id}").json()["actions"] == ["retry"]

    r = client.post(f"/api/jobs/{job_id}/retry", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {
        "job_id": job_id,
        "state": "queued",
        "message": f"job {job_id} sent to the inference queue",
    }
    assert queue.inference == [(job_id, "urgent"), (job_id, "urgent")]
    events = client.get(f"/api/jobs/{job_id}").json()["events"]
    assert events[-1]["state"] == "queued" and events[-1]["detail"] == "retried from the web API"


def test_retry_after_failed_delivery_only_redelivers(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """A job with results whose delivery failed goes back to encoded and the dispatch queue."""
    receive_series(catalog, f"{ROOT}.6", f"{ROOT}.6.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.6.1")
    fail_delivery(catalog, queue, job_id, "archive", "connection refused")
    r = client.post(f"/api/jobs/{job_id}/retry", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "encoded"
    assert "dispatch queue" in r.json()["message"]
    assert queue.dispatch == [job_id]
    assert [d.state for d in catalog.deliveries(job_id)] == ["pending"]


def test_retry_unfinished_job_conflicts(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """An unfinished job cannot be retried (409): a worker or a queue still owns it."""
    receive_series(catalog, f"{ROOT}.7", f"{ROOT}.7.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.7.1")
    queue_job(catalog, queue, job_id)
    r = client.post(f"/api/jobs/{job_id}/retry", headers=AUTH)
    assert r.status_code == 409
    assert (
        r.json()["detail"]
        == f"job {job_id} is queued; only failed, cancelled or done jobs can be retried"
    )
    assert queue.inference == [(job_id, "normal")]


def test_cancel_unfinished_job_and_refuse_finished(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """Cancel: unfinished job -> cancelled; finished one -> 409; a cancelled one can be retried."""
    receive_series(catalog, f"{ROOT}.8", f"{ROOT}.8.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.8.1")
    queue_job(catalog, queue, job_id)
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 401
    r = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    detail = client.get(f"/api/jobs/{job_id}").json()
    assert (
        detail["state"] == "cancelled"
        and detail["events"][-1]["detail"] == "cancelled from the web API"
    )
    again = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert again.status_code == 409 and "cannot be cancelled" in again.json()["detail"]
    assert client.post(f"/api/jobs/{job_id}/retry", headers=AUTH).json()["state"] == "queued"


def test_series_list_and_detail(client: TestClient, catalog: Catalog, queue: MemoryQueue) -> None:
    """GET /api/series lists newest first; /api/series/{uid} adds its jobs; unknown is 404."""
    now = time.time()
    receive_series(catalog, f"{ROOT}.9", f"{ROOT}.9.1", 4, start=now - 100)
    receive_series(catalog, f"{ROOT}.9", f"{ROOT}.9.2", 2, start=now - 50, modality="MR")
    job_a = make_job(catalog, f"{ROOT}.9.1", model="ct-tissue")
    job_b = make_job(catalog, f"{ROOT}.9.1", model="foreground")

    listed = client.get("/api/series").json()
    assert [s["series_instance_uid"] for s in listed] == [f"{ROOT}.9.2", f"{ROOT}.9.1"]
    assert listed[0]["modality"] == "MR" and listed[0]["state"] == "receiving"
    detail = client.get(f"/api/series/{ROOT}.9.1").json()
    assert detail["instance_count"] == 4 and detail["bytes_received"] == 4000
    assert detail["state"] == "complete" and detail["completion_reason"] == "idle"
    assert [(j["id"], j["model"]) for j in detail["jobs"]] == [
        (job_a, "ct-tissue"),
        (job_b, "foreground"),
    ]
    assert "patient_id" not in detail
    r = client.get(f"/api/series/{ROOT}.404")
    assert r.status_code == 404 and r.json()["detail"] == f"series {ROOT}.404 not found"


def test_destination_health(client: TestClient, catalog: Catalog, queue: MemoryQueue) -> None:
    """Per destination: last success, last error, counts; never-tried ones are unknown."""
    now = time.time()
    receive_series(catalog, f"{ROOT}.10", f"{ROOT}.10.1", start=now - 60)
    receive_series(catalog, f"{ROOT}.10", f"{ROOT}.10.2", start=now - 60)
    receive_series(catalog, f"{ROOT}.10", f"{ROOT}.10.3", start=now - 60)
    ok_job = make_job(catalog, f"{ROOT}.10.1", destinations=["archive"])
    run_to_done(catalog, queue, ok_job)
    bad_job = make_job(catalog, f"{ROOT}.10.2", destinations=["archive"])
    fail_delivery(
        catalog, queue, bad_job, "archive", "association rejected: called AE title not recognised"
    )
    old_job = make_job(catalog, f"{ROOT}.10.3", destinations=["legacy-pacs"])
    catalog.record_delivery(old_job, "legacy-pacs", ok=True)

    health = {d["name"]: d for d in client.get("/api/destinations").json()}
    assert list(health) == ["archive", "viewer", "legacy-pacs"]
    archive = health["archive"]
    assert archive["configured"] and archive["ae_title"] == "ARCHIVE" and archive["port"] == 4242
    assert archive["status"] == "failing"
    assert archive["last_error"] == "association rejected: called AE title not recognised"
    assert archive["last_failure_at"] >= archive["last_success_at"]
    assert (
        archive["delivered"],
        archive["failed"],
        archive["pending"],
        archive["failed_attempts"],
    ) == (1, 1, 0, 1)
    assert health["viewer"]["status"] == "unknown" and health["viewer"]["last_success_at"] is None
    assert health["legacy-pacs"]["configured"] is False and health["legacy-pacs"]["status"] == "ok"


def test_queue_depth_and_workers(client: TestClient, catalog: Catalog, queue: MemoryQueue) -> None:
    """GET /api/queue: queued per priority, encoded on dispatch, and worker heartbeats."""
    now = time.time()
    ids = []
    for i, prio in enumerate(["urgent", "normal", "normal", "normal"]):
        receive_series(catalog, f"{ROOT}.11", f"{ROOT}.11.{i}", start=now - 60)
        ids.append(make_job(catalog, f"{ROOT}.11.{i}", priority=prio))
    queue_job(catalog, queue, ids[0])
    queue_job(catalog, queue, ids[1])
    queue_job(catalog, queue, ids[2])
    encode(catalog, queue, ids[3])
    heartbeat.beat(catalog, "celery@gpu-01", 100, queues=["inference"], device="auto")
    heartbeat.set_current_job(
        catalog, "celery@gpu-01", 101, ids[2], "ct-tissue", queues=["inference"], device="cuda:0"
    )
    heartbeat.beat(
        catalog, "celery@old", 7, queues=["inference", "dispatch"], device="cpu", now=now - 120
    )

    q = client.get("/api/queue").json()
    depth = {(d["queue"], d["priority"]): d["depth"] for d in q["queues"]}
    assert depth == {
        ("inference", "urgent"): 1,
        ("inference", "normal"): 2,
        ("dispatch", "normal"): 1,
    }
    assert q["jobs_by_state"]["queued"] == 3 and q["jobs_by_state"]["encoded"] == 1
    assert q["jobs_by_state"]["failed"] == 0
    workers = {(w["hostname"], w["pid"]): w for w in q["workers"]}
    assert workers[("celery@gpu-01", 101)]["current_job_id"] == ids[2]
    assert workers[("celery@gpu-01", 101)]["current_model"] == "ct-tissue"
    assert (
        workers[("celery@gpu-01", 101)]["device"] == "cuda:0"
        and workers[("celery@gpu-01", 100)]["alive"]
    )
    assert (
        workers[("celery@old", 7)]["alive"] is False and workers[("celery@old", 7)]["age_s"] >= 120
    )


def test_throughput_over_last_hour(client: TestClient, catalog: Catalog) -> None:
    """Instances/min and studies/hour count only instances received in the last hour."""
    now = time.time()
    receive_series(catalog, f"{ROOT}.12", f"{ROOT}.12.1", 3, start=now - 30)
    receive_series(catalog, f"{ROOT}.13", f"{ROOT}.13.1", 3, start=now - 120)
    receive_series(catalog, f"{ROOT}.14", f"{ROOT}.14.1", 2, start=now - 7200)  # outside the window
    t = client.get("/api/throughput").json()
    assert t["instances"] == 6 and t["bytes"] == 6000 and t["studies"] == 2
    assert t["instances_per_minute"] == pytest.approx(6 / 60)
    assert t["studies_per_hour"] == pytest.approx(2.0)
    assert len(t["per_minute"]) == 60 and sum(t["per_minute"]) == 6
    assert t["per_minute"][-1] == 3  # the three received 30 s ago fall in the newest minute
    assert client.get("/api/throughput", params={"minutes": 180}).json()["instances"] == 8


def test_healthz_and_readyz(
    tmp_path: Path, settings: Settings, catalog: Catalog, queue: MemoryQueue
) -> None:
    """/healthz is 200; /readyz is 503 naming failing checks until worker, broker, disk are fine."""
    free = {"mb": 50.0}
    broker = {"ok": True}

    def broker_check() -> tuple[bool, str]:
        if not broker["ok"]:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        return True, "broker reachable"

    readiness = readiness_checks(
        broker=broker_check, free_mb=lambda: free["mb"], min_free_mb=settings.storage.min_free_mb
    )
    with TestClient(create_app(settings, catalog, queue, readiness=readiness)) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["failing"] == ["disk", "inference_worker"]
        assert (
            r.json()["checks"]["disk"]["detail"]
            == "spool has 50 MiB free, below the watermark storage.min_free_mb = 100"
        )
        assert (
            r.json()["checks"]["inference_worker"]["detail"]
            == "no inference worker heartbeat in the last 30 s"
        )
        assert r.json()["checks"]["database"]["ok"] is True

        free["mb"] = 5000.0
        heartbeat.beat(catalog, "celery@dispatch-only", 1, queues=["dispatch"], device=None)
        assert c.get("/readyz").json()["failing"] == ["inference_worker"]
        heartbeat.beat(catalog, "celery@gpu-01", 2, queues=["inference", "dispatch"], device="cpu")
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["failing"] == []

        broker["ok"] = False
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["failing"] == ["broker"]
        assert "ConnectionRefusedError" in r.json()["checks"]["broker"]["detail"]

        heartbeat.beat(
            catalog, "celery@gpu-01", 2, queues=["inference"], device="cpu", now=time.time() - 31
        )
        broker["ok"] = True
        assert c.get("/readyz").json()["failing"] == ["inference_worker"]


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    """/openapi.json lists every API route, and the mutating ones document 401/403/409."""
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/retry",
        "/api/jobs/{job_id}/cancel",
        "/api/series",
        "/api/series/{series_instance_uid}",
        "/api/destinations",
        "/api/rejected-associations",
        "/api/queue",
        "/api/throughput",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    assert {"401", "403", "404", "409"} <= set(
        paths["/api/jobs/{job_id}/retry"]["post"]["responses"]
    )
    assert "/" not in paths  # HTML pages are not part of the API


def test_dashboard_and_job_pages_render(client: TestClient, catalog: Catalog) -> None:
    """The dashboard and a job page are HTML shells naming the AE title, the states and the job."""
    receive_series(catalog, f"{ROOT}.16", f"{ROOT}.16.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.16.1")
    page = client.get("/", params={"state": "failed"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "DICOM_NODE" in page.text and '<option value="failed" selected>' in page.text
    job_page = client.get(f"/jobs/{job_id}")
    assert f"Job {job_id}" in job_page.text and f"{ROOT}.16.1" in job_page.text
    assert "Retry and cancel are disabled" not in job_page.text
    assert client.get("/static/app.js").status_code == 200


def test_web_server_serves_on_a_free_port_and_refuses_a_busy_one(
    settings: Settings, catalog: Catalog, queue: MemoryQueue
) -> None:
    """WebServer(port=0) serves on a free port until stopped; a busy port raises a clear error."""
    import httpx

    from dicom_node.web.server import WebServer, WebServerError

    app = create_app(settings, catalog, queue)
    with WebServer(app, "127.0.0.1", 0) as server:
        assert server.port > 0
        assert httpx.get(f"{server.url}/healthz", timeout=5).json()["status"] == "ok"
        busy = WebServer(app, "127.0.0.1", server.port)
        with pytest.raises(WebServerError, match=f"cannot listen on 127.0.0.1:{server.port}"):
            busy.start()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_job_detail_lists_each_object_outcome(client: TestClient, catalog: Catalog) -> None:
    """A refused class and a C-FIND outcome show per object and per destination in /api/jobs/{id}."""
    from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

    from dicom_node.delivery.report import InstanceResult, SendReport

    receive_series(catalog, f"{ROOT}.7", f"{ROOT}.7.1", 1, start=time.time())
    job_id = make_job(catalog, f"{ROOT}.7.1", destinations=["noseg", "verified"])
    seg = InstanceResult(Path("seg.dcm"), f"{ROOT}.9.1", 0, refused="refused: Segmentation Storage not accepted",
                         sop_class_uid=SegmentationStorage)
    sr = InstanceResult(Path("sr.dcm"), f"{ROOT}.9.2", 0, sop_class_uid=Comprehensive3DSRStorage)
    catalog.record_delivery(job_id, "noseg", ok=True, objects=SendReport("noseg", (seg, sr)).records())
    unconfirmed = {**sr.record(), "outcome": "unconfirmed", "detail": "not found by C-FIND at PACS@h:104"}
    catalog.record_delivery(job_id, "verified", ok=True, objects=[unconfirmed])

    deliveries = {d["destination"]: d for d in client.get(f"/api/jobs/{job_id}").json()["deliveries"]}
    assert deliveries["noseg"]["state"] == "done" and deliveries["noseg"]["confirmation"] is None
    assert deliveries["noseg"]["objects"] == [
        {"sop_instance_uid": f"{ROOT}.9.1", "sop_class": "Segmentation Storage", "outcome": "refused",
         "status": None, "detail": "refused: Segmentation Storage not accepted"},
        {"sop_instance_uid": f"{ROOT}.9.2", "sop_class": "Comprehensive 3D SR Storage", "outcome": "sent",
         "status": 0, "detail": None},
    ]
    assert deliveries["verified"]["confirmation"] == "unconfirmed"
    assert deliveries["verified"]["objects"][0]["detail"] == "not found by C-FIND at PACS@h:104"


def test_destination_reachability_is_reported_without_making_the_node_unready(
    settings: Settings, catalog: Catalog, queue: MemoryQueue, storescp_archive: Any
) -> None:
    """The prober C-ECHOes each destination (a real storescp answers, a closed port does not);
    /readyz lists both under "destinations" but fails no check for the one that is down, and
    /metrics exposes dicom_node_destination_reachable per destination."""
    from dicom_node.delivery.probe import DestinationProber
    from tests.support import procs

    probed = settings.model_copy(update={"destinations": [
        DestinationSettings(name="archive", ae_title="ARCHIVE", host=procs.LOOPBACK, port=storescp_archive.port),
        DestinationSettings(name="gone", ae_title="GONE", host=procs.LOOPBACK, port=procs.free_port()),
    ]})
    prober = DestinationProber(probed, timeout=5)
    prober.probe_once()
    metrics = NodeMetrics(catalog)
    metrics.watch_destinations(prober.results)
    app = create_app(settings, catalog, queue, metrics=metrics, destinations=prober.results)
    with TestClient(app) as c:
        body = c.get("/readyz").json()
        assert body["destinations"]["archive"]["reachable"] is True
        assert body["destinations"]["gone"]["reachable"] is False
        assert "does not answer C-ECHO" in body["destinations"]["gone"]["detail"]
        assert not [name for name in body["failing"] if "gone" in name or "destination" in name]
        text = c.get("/metrics").text
        assert 'dicom_node_destination_reachable{destination="archive"} 1.0' in text
        assert 'dicom_node_destination_reachable{destination="gone"} 0.0' in text


def test_models_say_where_they_are_warm(client: TestClient, catalog: Catalog) -> None:
    """/api/models: a model a live worker process holds is warm (with the process, its device
    and version), the others cold; a stale process's models count for nothing; /api/queue
    lists each process's warm models."""
    now = time.time()
    warm = [{"name": "foreground", "version": "1.0.0", "device": "cuda:0", "loaded_at": now - 50,
             "last_used": now - 50, "load_s": 0.2, "uses": 1},
            {"name": "ct-tissue", "version": "1.0.0", "device": "cuda:0", "loaded_at": now - 40,
             "last_used": now - 5, "load_s": 0.1, "uses": 3, "secret": "dropped"}]
    heartbeat.beat(catalog, "celery@gpu-01", 100, queues=["inference"], device="cuda:0")
    heartbeat.beat(catalog, "celery@gpu-01", 101, queues=["inference"], device="cuda:0", warm_models=warm)
    heartbeat.beat(catalog, "celery@old", 7, queues=["inference"], device="cpu", now=now - 120,
                   warm_models=[{"name": "ct-lung-nodules", "device": "cpu"}])
    models = {m["name"]: m for m in client.get("/api/models").json()}
    assert models["ct-tissue"]["warm"] is True and models["foreground"]["warm"] is True
    assert models["ct-lung-nodules"]["warm"] is False and models["ct-lung-nodules"]["warm_on"] == []
    (on,) = models["ct-tissue"]["warm_on"]
    assert (on["hostname"], on["pid"], on["device"], on["version"], on["uses"]) == (
        "celery@gpu-01", 101, "cuda:0", "1.0.0", 3)
    workers = {(w["hostname"], w["pid"]): w for w in client.get("/api/queue").json()["workers"]}
    assert workers[("celery@gpu-01", 101)]["warm_models"] == ["foreground", "ct-tissue"]
    assert workers[("celery@gpu-01", 100)]["warm_models"] == []
    # A beat without the list (a process that cannot say) keeps the last one reported.
    heartbeat.beat(catalog, "celery@gpu-01", 101, queues=["inference"], device="cuda:0")
    statuses = {(w.hostname, w.pid): w for w in heartbeat.worker_statuses(catalog)}
    assert [m["name"] for m in statuses[("celery@gpu-01", 101)].warm_models] == ["foreground", "ct-tissue"]


def test_job_reports_its_peak_memory_and_warm_start(client: TestClient, catalog: Catalog, queue: MemoryQueue) -> None:
    """The worker's ``memory`` and ``model_warm`` results are typed fields of /api/jobs."""
    receive_series(catalog, f"{ROOT}.41", f"{ROOT}.41.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.41.1")
    assert client.get(f"/api/jobs/{job_id}").json()["peak_memory"] is None
    encode(catalog, queue, job_id)
    job = catalog.get_job(job_id)
    assert job is not None
    catalog.set_results(job_id, {**job.results, "model_warm": False,
                                 "memory": {"device": "cpu", "kind": "rss", "peak_bytes": 3 * 2**20, "peak_mib": 3.0}})
    detail = client.get(f"/api/jobs/{job_id}").json()
    assert detail["peak_memory"] == {"device": "cpu", "kind": "rss", "peak_bytes": 3 * 2**20, "peak_mib": 3.0}
    assert detail["model_warm"] is False
    (listed,) = [j for j in client.get("/api/jobs").json() if j["id"] == job_id]
    assert listed["peak_memory"]["peak_mib"] == 3.0


def test_study_date_and_next_attempt_of_a_delivery_waiting_to_retry(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """22.9: a job shows its series' StudyDate; a delivery whose attempt failed transiently shows
    when it is tried next (job and delivery), and stops showing it once the job is finished."""
    now = time.time()
    receive_series(catalog, f"{ROOT}.7", f"{ROOT}.7.1", start=now - 30, study_date="20261205")
    job_id = make_job(catalog, f"{ROOT}.7.1", destinations=["archive"])
    encode(catalog, queue, job_id)
    catalog.transition(job_id, JobState.DELIVERING)
    catalog.record_delivery(job_id, "archive", ok=False, error="connection refused")
    catalog.schedule_delivery_retry(job_id, now + 60)
    detail = client.get(f"/api/jobs/{job_id}").json()
    assert detail["study_date"] == "20261205"
    assert detail["next_attempt_at"] == pytest.approx(now + 60)
    assert [d["next_attempt_at"] for d in detail["deliveries"]] == [pytest.approx(now + 60)]
    [listed] = [j for j in client.get("/api/jobs").json() if j["id"] == job_id]
    assert listed["next_attempt_at"] == pytest.approx(now + 60) and listed["study_date"] == "20261205"
    assert client.get(f"/api/series/{ROOT}.7.1").json()["study_date"] == "20261205"
    catalog.record_delivery(job_id, "archive", ok=True)  # the attempt itself clears it
    assert client.get(f"/api/jobs/{job_id}").json()["deliveries"][0]["next_attempt_at"] is None
    catalog.schedule_delivery_retry(job_id, now + 60)
    catalog.transition(job_id, JobState.CANCELLED, reason="cancelled")
    assert client.get(f"/api/jobs/{job_id}").json()["next_attempt_at"] is None


def test_a_study_date_that_is_not_a_date_is_not_kept(catalog: Catalog) -> None:
    """Only a DA (YYYYMMDD) is kept: a free-text value from a non-conforming sender is dropped."""
    receive_series(catalog, f"{ROOT}.8", f"{ROOT}.8.1", start=time.time(), study_date="yesterday")
    series = catalog.get_series(f"{ROOT}.8.1")
    assert series is not None and series.study_date is None


def test_keeps_first_instance_finding_is_recorded_once_and_shown(
    client: TestClient, catalog: Catalog, queue: MemoryQueue
) -> None:
    """22.4: a finding is recorded once (one job event), shown on /api/destinations, /readyz and
    /metrics, and gone from all three once cleared."""
    from dicom_node.catalog import KEEPS_FIRST_INSTANCE

    receive_series(catalog, f"{ROOT}.1", f"{ROOT}.1.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.1.1")
    assert catalog.record_destination_finding("viewer", KEEPS_FIRST_INSTANCE, "keeps the first; fix: X", job_id=job_id)
    assert not catalog.record_destination_finding("viewer", KEEPS_FIRST_INSTANCE, "again", job_id=job_id)
    assert [e.detail for e in catalog.job_events(job_id)].count("keeps the first; fix: X") == 1
    health = {d["name"]: d for d in client.get("/api/destinations").json()}
    assert health["viewer"]["keeps_first_instance"] == "keeps the first; fix: X"
    assert health["archive"]["keeps_first_instance"] is None
    assert client.get("/readyz").json()["warnings"] == {"viewer": {"keeps_first_instance": "keeps the first; fix: X"}}
    assert 'dicom_node_destination_keeps_first_instance{destination="viewer"} 1.0' in client.get("/metrics").text
    assert catalog.clear_destination_finding("viewer", KEEPS_FIRST_INSTANCE)
    assert "warnings" not in client.get("/readyz").json()
    assert "dicom_node_destination_keeps_first_instance{" not in client.get("/metrics").text


def test_rejected_associations_are_listed_newest_first_and_bounded(
    settings: Settings, catalog: Catalog, queue: MemoryQueue
) -> None:
    """22.9: /api/rejected-associations lists the newest rejections first, at most ``kept``, with
    the total since start; an app without a listener lists none."""
    from dicom_node.ingest.rejections import RejectionLog

    log = RejectionLog(kept=3)
    for i in range(5):
        log.add(f"AE{i}", "DICOM_NODE", f"10.0.0.{i}:104", "calling AE title not recognized", at=1000.0 + i)
    with TestClient(create_app(settings, catalog, queue, rejections=log)) as c:
        body = c.get("/api/rejected-associations").json()
    assert body["total"] == 5 and body["kept"] == 3
    assert [r["calling_ae_title"] for r in body["rejections"]] == ["AE4", "AE3", "AE2"]
    assert body["rejections"][0] == {"at": 1004.0, "calling_ae_title": "AE4", "called_ae_title": "DICOM_NODE",
                                     "peer": "10.0.0.4:104", "reason": "calling AE title not recognized"}
    with TestClient(create_app(settings, catalog, queue)) as c:
        assert c.get("/api/rejected-associations").json() == {"total": 0, "kept": 0, "rejections": []}
