"""The dashboard in a real headless Chromium: a failed job is listed, its page shows the timeline,
and the Retry button re-queues it through the token-protected API; study dates, the next attempt
of a delivery waiting to retry, an archive that keeps the first instance, and the associations a
real listener rejected are shown."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.catalog import KEEPS_FIRST_INSTANCE, Catalog, JobState
from dicom_node.catalog import heartbeats as heartbeat
from dicom_node.ingest.listener import Listener
from dicom_node.ingest.spool import Spool
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import ListenerSettings, StorageSettings
from dicom_node.web import WebServer, create_app
from tests.conftest import require_playwright, require_tool
from tests.support import procs
from tests.support.queues import MemoryQueue
from tests.support.sinks import CollectingSink
from tests.unit.test_web_api import (
    ROOT,
    TOKEN,
    encode,
    fail_delivery,
    make_job,
    make_settings,
    receive_series,
    run_to_done,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CRASH = "model crashed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
ARCHIVE_DOWN = "association with ARCHIVE@127.0.0.1:4242 failed: connection refused"
KEEPS_FIRST = ("destination viewer keeps the first object of a SOP Instance UID: after job 1 (generation 2) "
               "VIEWER@127.0.0.1:4243 still holds the object created 20261206 101010.000001, not the one "
               'sent (created 20261206 111111.000002), so corrected re-runs do not show there; fix: Orthanc: '
               '"OverwriteInstances": true; dcm4chee-arc: Overwrite Policy (dcmOverwritePolicy) ALWAYS, '
               "or SAME_SOURCE when only the node sends these objects")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A real DICOM listener (AE DICOM_NODE, only PACS may call) that rejected one stranger's
    C-ECHO (DCMTK echoscu) and accepted PACS's."""
    require_tool("echoscu")
    storage = StorageSettings(root=tmp_path / "listener-spool", min_free_mb=0)
    settings = ListenerSettings(port=procs.free_port(), allowed_calling_ae_titles=["PACS"])
    node = Listener(settings, Spool(storage.root), CollectingSink(), storage)
    node.start()
    try:
        for calling in ("INTRUDER", "PACS"):
            procs.run_tool(["echoscu", "-aet", calling, "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port)])
        yield node
    finally:
        node.stop()




@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """A page of the Debian Chromium (never a downloaded browser) with a fresh profile."""
    require_tool("chromium")
    sync_playwright = require_playwright()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=shutil.which("chromium"),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1100},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            context.close()


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[tuple[Catalog, MemoryQueue, dict[str, int]]]:
    """A catalog with a done job, an inference failure, a delivery failure and a queued job."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    queue = MemoryQueue()
    now = time.time()
    receive_series(catalog, f"{ROOT}.1", f"{ROOT}.1.1", 120, start=now - 300, step=0.5)
    receive_series(catalog, f"{ROOT}.2", f"{ROOT}.2.1", 60, start=now - 200, step=0.5, study_date="20261205")
    receive_series(catalog, f"{ROOT}.3", f"{ROOT}.3.1", 40, start=now - 100, step=0.5)
    receive_series(catalog, f"{ROOT}.4", f"{ROOT}.4.1", 30, start=now - 60, step=0.5)
    receive_series(catalog, f"{ROOT}.5", f"{ROOT}.5.1", 20, start=now - 40, step=0.5, study_date="20261206")
    jobs = {
        "done": make_job(catalog, f"{ROOT}.1.1", destinations=["archive", "viewer"]),
        "failed": make_job(catalog, f"{ROOT}.2.1", model="lung-nodules", priority="urgent"),
        "undelivered": make_job(
            catalog, f"{ROOT}.3.1", model="foreground", destinations=["viewer"]
        ),
        "queued": make_job(catalog, f"{ROOT}.4.1"),
        "retrying": make_job(catalog, f"{ROOT}.5.1", destinations=["archive"]),
    }
    run_to_done(catalog, queue, jobs["done"])
    queue_job(catalog, queue, jobs["failed"])
    catalog.transition(jobs["failed"], JobState.RUNNING, count_attempt=True)
    catalog.transition(jobs["failed"], JobState.FAILED, reason=CRASH)
    fail_delivery(
        catalog,
        queue,
        jobs["undelivered"],
        "viewer",
        "association rejected by VIEWER@127.0.0.1:4243: called AE title not recognised",
    )
    queue_job(catalog, queue, jobs["queued"])
    # Delivering, its first attempt failed, the worker's retry countdown recorded (workers.tasks).
    encode(catalog, queue, jobs["retrying"])
    catalog.transition(jobs["retrying"], JobState.DELIVERING)
    catalog.record_delivery(jobs["retrying"], "archive", ok=False, error=ARCHIVE_DOWN)
    catalog.schedule_delivery_retry(jobs["retrying"], now + 600)
    catalog.record_destination_finding("viewer", KEEPS_FIRST_INSTANCE, KEEPS_FIRST, job_id=jobs["done"])
    heartbeat.beat(catalog, "celery@gpu-01", 4242, queues=["inference", "dispatch"], device="cpu")
    queue.inference.clear()
    queue.dispatch.clear()
    try:
        yield catalog, queue, jobs
    finally:
        catalog.close()


def test_failed_job_is_listed_shown_and_retried(
    tmp_path: Path, browser_page: Any, populated: tuple[Catalog, MemoryQueue, dict[str, int]],
    listener: Listener,
) -> None:
    """The dashboard lists the failed job, its page shows timeline and error, Retry re-queues it;
    the panels show study dates, the next delivery attempt, the destination that keeps the first
    instance and the listener's rejected association."""
    catalog, queue, jobs = populated
    failed = jobs["failed"]
    heartbeat.beat(catalog, "celery@gpu-01", 4243, queues=["inference", "dispatch"], device="cpu",
                   warm_models=[{"name": "ct-tissue", "version": "1.0.0", "device": "cpu"}])
    receive_series(catalog, f"{ROOT}.9", f"{ROOT}.9.1", 5, start=time.time() - 50, modality="MR")
    catalog.mark_series_complete(f"{ROOT}.9.1", "idle", "no routing rule matched")
    server = WebServer(create_app(make_settings(tmp_path), catalog, queue, rejections=listener.rejections),
                       "127.0.0.1", 0)
    server.start()
    page = browser_page
    try:
        page.goto(server.url + "/")
        row = page.locator(f'#jobs-table tbody tr[data-job-id="{failed}"]')
        row.wait_for()
        assert row.get_attribute("data-state") == "failed"
        assert "lung-nodules" in row.inner_text() and f"{ROOT}.2.1" in row.inner_text()
        # The series named (with its study date), not only UID tails.
        assert "CT · from CT1 · study 2026-12-05 · gen 1" in row.inner_text()
        reason = row.locator(".reason")
        assert reason.inner_text() == CRASH  # the whole reason, wrapped, never cut
        assert reason.evaluate(  # nothing overflows, and it takes more than one line
            "e => e.scrollWidth <= e.clientWidth"
            " && e.getBoundingClientRect().height > 1.8 * parseFloat(getComputedStyle(e).fontSize)") is True
        page.locator("#workers-table tbody tr", has_text="celery@gpu-01").wait_for()
        # The worker's main process and its pool child are one worker: one row, both pids.
        workers = page.locator('#workers-table tbody tr[data-hostname="celery@gpu-01"]')
        assert workers.count() == 1 and "4242, 4243" in workers.inner_text()
        # The pool child's warm model, in the worker's "warm models" column.
        assert workers.locator(".warm-models").inner_text() == "ct-tissue"
        # 20.3: the models panel lists every model with its version, where it is warm, its rules.
        tissue = page.locator('#models-table tbody tr[data-model="ct-tissue"]')
        tissue.wait_for()
        assert tissue.get_attribute("data-warm") == "warm"
        assert "warm on celery@gpu-01 pid 4243 (cpu)" in tissue.locator(".warm-state").inner_text()
        assert tissue.locator(".rules").inner_text() == ", ".join(
            r.name for r in make_settings(tmp_path).rules if "ct-tissue" in r.models) or "no rule"
        cold = page.locator('#models-table tbody tr[data-model="foreground"]')
        assert cold.get_attribute("data-warm") == "cold" and cold.locator(".warm-state").inner_text() == "cold"
        page.locator('#destinations-table tbody tr[data-destination="viewer"]', has_text="failing").wait_for()
        # 22.3: the series no rule matched has its own panel, with the reason.
        unmatched = page.locator(f'#unmatched-table tbody tr[data-series-uid="{ROOT}.9.1"]')
        unmatched.wait_for()
        assert "MR" in unmatched.inner_text() and "no routing rule is configured" in unmatched.inner_text()
        assert page.locator("#unmatched-count").inner_text() == "(1)"
        # 22.9: a delivery waiting for its retry says when; a finished job says nothing of it.
        retrying = page.locator(f'#jobs-table tbody tr[data-job-id="{jobs["retrying"]}"]')
        retrying.locator(".next-attempt").wait_for()
        assert retrying.locator(".next-attempt").inner_text().startswith("next attempt at ")
        assert "(in 9 min" in retrying.locator(".next-attempt").inner_text()
        assert page.locator(f'#jobs-table tbody tr[data-job-id="{jobs["done"]}"] .next-attempt').count() == 0
        # 22.4: the archive that keeps the first instance, with the fix, under its destination.
        warning = page.locator('#destinations-table tr[data-keeps-first="viewer"]')
        warning.wait_for()
        assert "OverwriteInstances" in warning.inner_text() and "dcmOverwritePolicy" in warning.inner_text()
        # 22.9: the association the real listener rejected: who, from where, why; not PACS's.
        rejected = page.locator('#rejected-table tbody tr[data-calling-ae="INTRUDER"]')
        rejected.wait_for()
        assert "calling AE title not recognized" in rejected.inner_text()
        assert "DICOM_NODE" in rejected.inner_text() and "127.0.0.1:" in rejected.inner_text()
        assert page.locator('#rejected-table tbody tr[data-calling-ae="PACS"]').count() == 0
        assert page.locator("#rejected-count").inner_text() == "(1 since start)"

        page.select_option("#state-filter", "failed")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#jobs-table tbody tr')]"
            ".every(r => r.dataset.state === 'failed')"
        )
        assert (
            page.locator("#jobs-table tbody tr").count() == 2
        )  # inference failure + delivery failure
        ARTIFACTS.mkdir(exist_ok=True)
        page.select_option("#state-filter", "")
        page.wait_for_function(
            "() => document.querySelectorAll('#jobs-table tbody tr').length === 5"
        )
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        page.goto(server.url + f"/jobs/{jobs['retrying']}")
        delivery = page.locator('#deliveries-table tbody tr[data-destination="archive"]')
        delivery.locator(".next-attempt", has_text="next attempt at").wait_for()
        assert ARCHIVE_DOWN in delivery.inner_text()
        page.goto(server.url + "/")
        row.wait_for()

        row.locator("a").click()
        page.wait_for_url(f"**/jobs/{failed}")
        timeline = page.locator("#timeline-table tbody tr")
        page.wait_for_function(
            "() => document.querySelectorAll('#timeline-table tbody tr').length === 4"
        )
        assert [timeline.nth(i).get_attribute("data-state") for i in range(4)] == [
            "received",
            "queued",
            "running",
            "failed",
        ]
        error = page.locator("#job-error")
        assert error.is_visible() and CRASH in error.inner_text()

        page.on("dialog", lambda dialog: dialog.accept(TOKEN))
        retry = page.locator("#retry-button")
        page.wait_for_function("() => !document.getElementById('retry-button').disabled")
        retry.click()
        page.locator("#action-message", has_text="sent to the inference queue").wait_for()
        page.locator("#job-state", has_text="queued").wait_for()
        page.wait_for_function(
            "() => document.querySelectorAll('#timeline-table tbody tr').length === 5"
        )
        assert page.evaluate("() => sessionStorage.getItem('dicomNodeApiToken')") == TOKEN
        assert "Last error" in error.inner_text() and CRASH in error.inner_text()
        page.screenshot(path=str(ARTIFACTS / "job.png"), full_page=True)
    finally:
        server.stop()

    job = catalog.get_job(failed)
    assert job is not None and job.state == "queued" and job.reason == "retried from the web API"
    assert queue.inference == [(failed, "urgent")] and queue.dispatch == []


@pytest.mark.slow
def test_real_c_store_job_on_a_running_node(tmp_path: Path, browser_page: Any) -> None:
    """Against a running `dicom-node serve`: a series sent with storescu to a node whose archive
    is down gives a failed job that the dashboard lists; its page shows the timeline; once the
    archive is up, the Retry button re-queues it and the results arrive."""
    from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
    from tests.support import procs
    from tests.support.node import node_config, start_node, wait_until

    require_tool("storescu", "storescp")
    phantom = make_chest_phantom(ChestSpec(slices=12))
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="browser")), tmp_path / "ct")
    archive_port = procs.free_port()
    web_port = procs.free_port()
    config = node_config(
        tmp_path / "node",
        # SEG + SR only, no not-applied notice: the test counts those two files.
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive_port,
                       "outputs": ["seg", "sr"], "notify_not_applied": False}],
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": ["archive"]}],
        web={"enabled": True, "host": procs.LOOPBACK, "port": web_port, "api_token": TOKEN},
    )
    node = start_node(tmp_path / "node", config)
    archive: procs.Server | None = None
    page = browser_page
    try:
        res = procs.run_tool(["storescu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port), *map(str, files)])
        assert res.returncode == 0, res.stderr
        catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}")
        job = wait_until(lambda: next((j for j in catalog.list_jobs() if j.state == "failed"), None), 120,
                         what="the job to fail on the unreachable archive")
        page.goto(f"http://{procs.LOOPBACK}:{web_port}/")
        row = page.locator(f'#jobs-table tbody tr[data-job-id="{job.id}"]')
        row.wait_for()
        assert row.get_attribute("data-state") == "failed" and "ct-tissue" in row.inner_text()
        row.locator("a").click()
        page.wait_for_url(f"**/jobs/{job.id}")
        page.wait_for_function("() => document.querySelectorAll('#timeline-table tbody tr').length >= 6")
        states = page.locator("#timeline-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.state)")
        assert states[:4] == ["received", "queued", "running", "encoded"] and states[-1] == "failed"
        assert str(archive_port) in page.locator("#job-error").inner_text()

        archive = procs.start_storescp(tmp_path / "archive", port=archive_port)
        page.on("dialog", lambda dialog: dialog.accept(TOKEN))
        page.wait_for_function("() => !document.getElementById('retry-button').disabled")
        page.locator("#retry-button").click()
        wait_until(lambda: catalog.get_job(job.id).state == "done", 90, what="the retried job to be delivered")  # type: ignore[union-attr]
        page.reload()
        page.locator("#job-state", has_text="done").wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "job-real-node.png"), full_page=True)
        received = list(Path(archive.extra["received"]).iterdir())
        assert len(received) == 2  # SEG + SR

        # Resend: the stored results go out again (the model does not run), audited.
        page.wait_for_function("() => !document.getElementById('resend-button').disabled")
        page.locator("#resend-button").click()
        page.locator("#action-message", has_text="stored results queued for delivery to archive").wait_for()
        wait_until(lambda: any("resend by operator (web API)" in (e.detail or "")
                               for e in catalog.job_events(job.id)) and catalog.get_job(job.id).state == "done",  # type: ignore[union-attr]
                   90, what="the resent job to be done again")
        delivery = catalog.deliveries(job.id)[0]
        assert delivery.state == "done" and delivery.attempts == 1  # counted afresh for the resend
        assert [e.state for e in catalog.job_events(job.id)].count("running") == 1  # no model run

        # Re-run: a new generation of the series, a new job, audited, delivered.
        page.wait_for_function("() => !document.getElementById('rerun-button').disabled")
        page.locator("#rerun-button").click()
        page.locator("#rerun-link").click()
        page.wait_for_url("**/jobs/*")
        new_id = int(page.url.rsplit("/", 1)[1])
        assert new_id > job.id
        rerun = wait_until(lambda: (lambda j: j if j and j.state in ("done", "failed") else None)(
            catalog.get_job(new_id)), 120, what="the re-run job to finish")
        assert rerun.state == "done" and rerun.generation == 2 and rerun.model == "ct-tissue", rerun.reason
        first = catalog.job_events(new_id)[0]
        assert first.state == "received" and "rerun by operator (web API)" in (first.detail or "")
        page.locator("#job-state", has_text="done").wait_for()
    finally:
        if archive is not None:
            archive.stop()
        node.stop()


def test_api_page_works_offline(
    tmp_path: Path, browser_page: Any, populated: tuple[Catalog, MemoryQueue, dict[str, int]]
) -> None:
    """/docs renders Swagger UI with every operation while the browser may reach nothing but the
    node: its script and style come from the node (swagger-ui-bundle), not from a CDN."""
    catalog, queue, _ = populated
    server = WebServer(create_app(make_settings(tmp_path), catalog, queue), "127.0.0.1", 0)
    server.start()
    page = browser_page
    outside: list[str] = []

    def only_the_node(route: Any) -> None:
        url = route.request.url
        if url.startswith(server.url):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", only_the_node)
    try:
        page.goto(server.url + "/docs")
        page.locator(".swagger-ui .opblock-summary-path", has_text="/api/series/{series_instance_uid}/rerun").wait_for()
        assert page.locator(".swagger-ui .opblock").count() >= 15
        assert outside == []
    finally:
        server.stop()


def test_series_page_shows_the_series_and_reruns_it(
    tmp_path: Path, browser_page: Any, populated: tuple[Catalog, MemoryQueue, dict[str, int]]
) -> None:
    """The job page's series UID opens the series page (facts, no patient data, its jobs); its
    Re-run button starts a new generation through the API, audited; an unmatched series' page
    says why no rule matched."""
    catalog, queue, jobs = populated
    catalog.mark_series_complete(f"{ROOT}.1.1", "association")
    receive_series(catalog, f"{ROOT}.9", f"{ROOT}.9.1", 5, start=time.time() - 50, modality="MR")
    catalog.mark_series_complete(f"{ROOT}.9.1", "idle", "no routing rule matched")
    server = WebServer(create_app(make_settings(tmp_path), catalog, queue), "127.0.0.1", 0)
    server.start()
    page = browser_page
    try:
        page.goto(server.url + f"/jobs/{jobs['done']}")
        page.locator(f'#job a[href="/series/{ROOT}.1.1"]').click()
        page.wait_for_url(f"**/series/{ROOT}.1.1")
        facts = page.locator("#series .facts").inner_text()
        assert f"{ROOT}.1.1" in facts and "CT1" in facts and "association" in facts
        assert page.locator(f'#series-jobs-table tbody tr[data-job-id="{jobs["done"]}"]').count() == 1
        page.on("dialog", lambda dialog: dialog.accept(TOKEN))
        page.locator("#series-rerun-button").click()
        page.locator("#action-message .new-job").wait_for()
        new_id = int(page.locator("#action-message .new-job").inner_text().split()[-1])
        new = catalog.get_job(new_id)
        assert new is not None and new.generation == 2 and new.model == "ct-tissue" and new.state == "queued"
        assert "rerun by operator (web API)" in (catalog.job_events(new_id)[0].detail or "")
        assert (new_id, "normal") in queue.inference

        page.goto(server.url + f"/series/{ROOT}.9.1")
        assert "no routing rule is configured" in page.locator("#series-routing").inner_text()
        assert page.locator("#series-jobs-table tbody").inner_text().strip() == "no job"

        # 22.9: the study date on the series page and on its job's page.
        page.goto(server.url + f"/series/{ROOT}.2.1")
        assert page.locator("#series-study-date").inner_text() == "2026-12-05"
        page.goto(server.url + f"/jobs/{jobs['failed']}")
        assert page.locator("#job-study-date").inner_text() == "2026-12-05"
    finally:
        server.stop()
