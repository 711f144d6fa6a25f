"""The operator endpoints of the API: resend, rerun, reprocess (token-protected, audited) and
the unmatched-series list; the CLI's retry on a done job whose results are gone runs it again."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from dicom_node.catalog import Catalog, JobState
from dicom_node.scheduling.operator import retry_job
from tests.support.queues import MemoryQueue
from tests.unit.test_web_api import (  # noqa: F401 - pytest fixtures
    AUTH,
    ROOT,
    catalog,
    client,
    make_job,
    queue,
    receive_series,
    run_to_done,
    settings,
)


def test_operator_calls_need_the_token(client: TestClient, catalog: Catalog) -> None:  # noqa: F811
    receive_series(catalog, f"{ROOT}.20", f"{ROOT}.20.1", start=time.time() - 30)
    catalog.mark_series_complete(f"{ROOT}.20.1", "idle")
    for url in (f"/api/series/{ROOT}.20.1/rerun", f"/api/series/{ROOT}.20.1/reprocess", "/api/jobs/1/resend"):
        assert client.post(url).status_code == 401, url
    assert catalog.list_jobs() == []


def test_rerun_makes_a_new_generation_audited(
    client: TestClient, catalog: Catalog, queue: MemoryQueue  # noqa: F811
) -> None:
    receive_series(catalog, f"{ROOT}.21", f"{ROOT}.21.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.21.1")
    run_to_done(catalog, queue, job_id)
    assert catalog.get_series(f"{ROOT}.21.1").state == "complete"  # type: ignore[union-attr]
    r = client.post(f"/api/series/{ROOT}.21.1/rerun", headers=AUTH)
    assert r.status_code == 200, r.text
    [new_id] = r.json()["job_ids"]
    new = catalog.get_job(new_id)
    assert new is not None and new.generation == 2 and new.state == "queued" and new_id > job_id
    assert catalog.job_events(new_id)[0].detail == "rule ct-rule; rerun by operator (web API)"
    assert client.get(f"/api/series/{ROOT}.21.1").json()["generation"] == 2
    assert client.post("/api/series/1.2.3.404/rerun", headers=AUTH).status_code == 404
    r = client.post(f"/api/series/{ROOT}.21.1/rerun?model=nope", headers=AUTH)
    assert r.status_code == 409 and "no routing rule names model 'nope'" in r.json()["detail"]


def test_resend_needs_results_on_disk(
    client: TestClient, catalog: Catalog, queue: MemoryQueue, tmp_path: Path  # noqa: F811
) -> None:
    receive_series(catalog, f"{ROOT}.22", f"{ROOT}.22.1", start=time.time() - 30)
    job_id = make_job(catalog, f"{ROOT}.22.1")
    run_to_done(catalog, queue, job_id)  # its result paths (/outbox/...) do not exist
    r = client.post(f"/api/jobs/{job_id}/resend", headers=AUTH)
    assert r.status_code == 409 and "gone from the outbox" in r.json()["detail"]
    # retry of that done job cannot resend: it runs the model again, every delivery pending.
    assert retry_job(catalog, queue, job_id, reason="retried by operator (cli)").endswith("inference queue")
    job = catalog.get_job(job_id)
    assert job is not None and job.state == JobState.QUEUED.value
    assert {d.state for d in catalog.deliveries(job_id)} == {"pending"}

    files = [tmp_path / "seg.dcm", tmp_path / "sr.dcm"]
    for f in files:
        f.write_bytes(b"x")
    receive_series(catalog, f"{ROOT}.23", f"{ROOT}.23.1", start=time.time() - 30)
    other = make_job(catalog, f"{ROOT}.23.1", destinations=["archive"])
    run_to_done(catalog, queue, other)
    catalog.set_results(other, {"files": [str(f) for f in files]})
    r = client.post(f"/api/jobs/{other}/resend?to=viewer", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["messages"] == [f"job {other} (ct-tissue): stored results queued for delivery to viewer"]
    job = catalog.get_job(other)
    assert job is not None and job.state == "encoded" and job.destinations == ["archive", "viewer"]
    assert {d.destination: d.state for d in catalog.deliveries(other)} == {"archive": "done", "viewer": "pending"}
    assert queue.dispatch[-1] == other
    assert catalog.job_events(other)[-1].detail == "resend by operator (web API) to viewer"
    assert client.post(f"/api/jobs/{other}/resend?to=nowhere", headers=AUTH).status_code == 404


def test_reprocess_and_unmatched_list(client: TestClient, catalog: Catalog) -> None:  # noqa: F811
    receive_series(catalog, f"{ROOT}.24", f"{ROOT}.24.1", start=time.time() - 30, modality="MR")
    catalog.mark_series_complete(f"{ROOT}.24.1", "idle", "no routing rule matched")
    listed = client.get("/api/unmatched-series").json()
    assert listed["total"] == 1
    assert listed["series"][0]["series_instance_uid"] == f"{ROOT}.24.1"
    assert listed["series"][0]["routing"] == ["no routing rule is configured"]
    r = client.post(f"/api/series/{ROOT}.24/reprocess", headers=AUTH)  # the study UID
    assert r.status_code == 200 and r.json()["job_ids"] == []
    assert "no routing rule matched (no routing rule is configured)" in r.json()["messages"][0]
    assert client.post("/api/series/1.2.3.404/reprocess", headers=AUTH).status_code == 404
