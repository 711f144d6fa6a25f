"""Hostile data and careless operators against a real node (issue 18, items 5, 6, 9-12, 14).

Every test starts a real ``dicom-node serve`` (with its in-process worker on the embedded
broker unless said otherwise), sends over a real socket with DCMTK ``storescu`` or pynetdicom,
and checks files, the catalog, the API, the CLI and the logs.
"""

from __future__ import annotations

import grp
import os
import stat
import time
from pathlib import Path

import pytest

from tests.integration.test_faults import (
    catalog_of,
    child_pids,
    destination,
    rule,
    series_files,
    sigkill,
    start_archive,
    storescu,
    wait_job,
)
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in child_pids(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _other_group() -> grp.struct_group:
    """A group that is not the test process's own (the node is told to use it)."""
    candidates = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    if os.geteuid() != 0:
        candidates = [g for g in candidates if g.gr_gid in os.getgroups()]
    if not candidates:
        pytest.skip("no second group to give files to (not root, no supplementary group)")
    return next((g for g in candidates if g.gr_name in ("adm", "daemon", "users")), candidates[0])


# -- item 6: file modes -----------------------------------------------------------------------


def test_spool_and_outbox_are_not_world_readable(tmp_path: Path) -> None:
    """Received instances and encoded results are 0640 in 0750 folders, in ``[storage] group``:
    another local user can read no patient data."""
    group = _other_group()
    archive = start_archive(tmp_path / "archive")
    workdir = tmp_path / "node"
    config = node_config(workdir, destinations=[destination(archive.port)],
                         rules=[rule("ct", "ct-tissue", ["archive"])], storage={"group": group.gr_name})
    node = start_node(workdir, config)
    try:
        files = series_files(tmp_path, "modes")
        storescu(node.port, files)
        catalog = catalog_of(node)
        from dicom_node.demo import SeriesInfo

        wait_job(node, catalog, SeriesInfo(seed="modes").uid("series"), ("done",))
        catalog.close()
    finally:
        node.stop()
        archive.stop()
    spool, outbox = workdir / "spool", workdir / "outbox"
    written = [p for root in (spool, outbox) for p in root.rglob("*")]
    instances = [p for p in written if p.is_file() and p.is_relative_to(spool)]
    results = [p for p in written if p.is_file() and p.is_relative_to(outbox)]
    folders = [spool, outbox, *(p for p in written if p.is_dir())]
    # SEG, SR and the outbox manifest.json (test_faults' destination takes SEG + SR only)
    assert len(instances) == len(files) and len(results) == 3, (instances, results)
    modes = {str(p.relative_to(workdir)): (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid)
             for p in [*instances, *results, *folders]}
    wrong = {p: (oct(m), gid) for p, (m, gid) in modes.items()
             if gid != group.gr_gid or m != (0o750 if (workdir / p).is_dir() else 0o640)}
    assert wrong == {}, wrong


# -- item 12: the in-process worker dies with the node ------------------------------------------


def test_in_process_worker_dies_with_a_killed_node(tmp_path: Path) -> None:
    """SIGKILL of ``serve`` takes its in-process worker (and the worker's pool) with it within
    seconds: no orphan keeps consuming jobs."""
    workdir = tmp_path / "node"
    node = start_node(workdir, node_config(workdir))
    try:
        pid = node.server.proc.pid
        workers = wait_until(lambda: {p for p in descendants(pid) if alive(p)} if len(descendants(pid)) >= 2 else None,
                             60, what="the worker and its pool child")
        t0 = time.monotonic()
        sigkill(pid)
        node.server.proc.wait(10)
        try:
            wait_until(lambda: not any(alive(p) for p in workers), 10, interval=0.05, what="orphans gone")
        finally:
            for p in workers:
                sigkill(p)
        gone_after = time.monotonic() - t0
        print(f"{len(workers)} worker processes gone {gone_after:.2f} s after the node's SIGKILL")
    finally:
        node.stop()


# -- items 10 and 11: delivery attempts, operator retry --------------------------------------------


def _api(node_web: int, method: str, path: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{procs.LOOPBACK}:{node_web}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback test server
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


TOKEN = "hostile-data-token"  # noqa: S105 - the test node's API token


def test_delivery_attempts_are_the_configured_ones_then_failed_and_api_retry_resets(tmp_path: Path) -> None:
    """``[delivery] max_attempts`` = 7 with short backoffs: an archive down for 5 attempts gets
    the results at attempt 6 (Celery's default of 3 retries used to end it at 4, leaving the job
    ``delivering``); one down for good fails the job after exactly 7 attempts with the reason;
    a retry from the API starts the count again and delivers."""
    from dicom_node.demo import SeriesInfo
    from tests.integration.test_faults import archive_stores

    port = procs.free_port()
    web = procs.free_port()
    workdir = tmp_path / "node"
    config = node_config(workdir, idle_seconds=0.5, destinations=[destination(port)],
                         rules=[rule("ct", "ct-tissue", ["archive"])],
                         delivery={"max_attempts": 7, "backoff_seconds": 0.2, "backoff_max_seconds": 0.4},
                         web={"enabled": True, "host": procs.LOOPBACK, "port": web, "api_token": TOKEN})
    node = start_node(workdir, config)
    archive: procs.Server | None = None
    try:
        catalog = catalog_of(node)
        first = SeriesInfo(seed="late-archive").uid("series")
        storescu(node.port, series_files(tmp_path, "late-archive"))
        job = wait_job(node, catalog, first, ("delivering",))
        wait_until(lambda: catalog.deliveries(job.id)[0].attempts >= 5, 60, interval=0.05, what="five attempts")
        archive = start_archive(tmp_path / "archive", port=port)
        job = wait_job(node, catalog, first, ("done", "failed"))
        assert job.state == "done", job.reason
        [delivery] = catalog.deliveries(job.id)
        assert delivery.state == "done" and 6 <= delivery.attempts <= 7, delivery.attempts
        assert len(archive_stores(archive)) == 2
        archive.stop()
        archive = None

        second = SeriesInfo(seed="no-archive").uid("series")
        storescu(node.port, series_files(tmp_path, "no-archive"))
        t0 = time.monotonic()
        job = wait_job(node, catalog, second, ("done", "failed"))
        took = time.monotonic() - t0
        assert job.state == "failed"
        [delivery] = catalog.deliveries(job.id)
        assert delivery.attempts == 7, delivery.attempts
        assert "delivery failed after 7 attempts" in (job.reason or "")
        assert f"ARCHIVE@127.0.0.1:{port}" in (job.reason or "")
        print(f"7 delivery attempts, failed {took:.1f} s after the series was sent")

        archive = start_archive(tmp_path / "archive2", port=port)
        code, body = _api(web, "POST", f"/api/jobs/{job.id}/retry", TOKEN)
        assert code == 200, body
        job = wait_job(node, catalog, second, ("done", "failed"))
        assert job.state == "done", job.reason
        [delivery] = catalog.deliveries(job.id)
        assert delivery.attempts == 1
        assert len(archive_stores(archive)) == 2
        catalog.close()
    finally:
        node.stop()
        if archive is not None:
            archive.stop()


def test_operator_retry_after_the_attempt_limit_runs_the_job_again(tmp_path: Path) -> None:
    """A job failed at ``[worker] max_attempts`` (here 1: a broken model file) and retried by
    ``dicom-node retry`` once the model is fixed really runs (attempt 1 again), instead of
    failing at once as a poison job."""
    from dicom_node.demo import SeriesInfo
    from tests.integration.test_faults import busy_model, cli

    model = busy_model(tmp_path / "models" / "fixed", "fixed", [12, 96, 96], seconds_per_patch=0.01)
    weights = Path(model["path"]) / "model.pt"
    good = weights.read_bytes()
    weights.write_bytes(b"not a TorchScript file")
    workdir = tmp_path / "node"
    config = node_config(workdir, idle_seconds=0.5, rules=[rule("ct", "fixed", [])], worker={"max_attempts": 1})
    config["models"] = [model]
    node = start_node(workdir, config)
    try:
        catalog = catalog_of(node)
        series = SeriesInfo(seed="retry-me").uid("series")
        storescu(node.port, series_files(tmp_path, "retry-me"))
        job = wait_job(node, catalog, series, ("done", "failed"))
        assert job.state == "failed" and job.attempts == 1
        assert "not a TorchScript file" in (job.reason or "")
        weights.write_bytes(good)
        res = cli(node, "retry", str(job.id))
        assert res.returncode == 0 and f"job {job.id} is now queued" in res.stdout, res.stdout + res.stderr
        job = wait_job(node, catalog, series, ("done", "failed"))
        assert job.state == "done", job.reason
        assert job.attempts == 1
        events = [(e.state, e.detail) for e in catalog.job_events(job.id)]
        assert ("queued", "retried by operator (cli)") in events
        assert not any("poison" in (d or "") for _, d in events), events
        catalog.close()
    finally:
        node.stop()


# -- item 5: no patient value in any output, even from a library's exception or warning -------

#: Recognisable patient values; the first series' birth date is non-conformant (DA is YYYYMMDD).
PHI_NAME = "Vexlethorpe"  # one component: highdicom warns, quoting it
PHI_ID = "PID-61829374-XQ"
PHI_BAD_BIRTH = "1933-11-22"
PHI_BIRTH = "19331122"
PHI = (PHI_NAME, PHI_ID, PHI_BAD_BIRTH, PHI_BIRTH, "61829374")


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{port}{path}", timeout=30) as resp:
        return str(resp.read().decode("utf-8", errors="replace"))


def test_no_patient_value_reaches_any_output(tmp_path: Path) -> None:
    """A series with a non-conformant PatientBirthDate fails at its first attempt with a reason
    naming the attribute, not its value; one whose single-component PatientName makes highdicom
    warn is processed.  The name, ID and birth dates are in none of: the node's and the worker's
    logs, /api/jobs, /api/series, /api/jobs/{id}, the dashboard pages, `dicom-node jobs` (text
    and JSON), /metrics, the catalog database files."""
    from dicom_node.demo import SeriesInfo
    from tests.integration.test_faults import cli

    web = procs.free_port()
    workdir = tmp_path / "node"
    config = node_config(workdir, idle_seconds=0.5, rules=[rule("ct", "ct-tissue", [])],
                         web={"enabled": True, "host": procs.LOOPBACK, "port": web, "api_token": TOKEN})
    node = start_node(workdir, config)
    try:
        bad = series_files(tmp_path, "phi-bad-date", patient_name=PHI_NAME, patient_id=PHI_ID,
                           patient_birth_date=PHI_BAD_BIRTH)
        good = series_files(tmp_path, "phi-one-name", patient_name=PHI_NAME, patient_id=PHI_ID,
                            patient_birth_date=PHI_BIRTH)
        storescu(node.port, bad)
        storescu(node.port, good)
        catalog = catalog_of(node)
        failed = wait_job(node, catalog, SeriesInfo(seed="phi-bad-date").uid("series"), ("done", "failed"))
        done = wait_job(node, catalog, SeriesInfo(seed="phi-one-name").uid("series"), ("done", "failed"))
        assert failed.state == "failed" and failed.attempts == 1, (failed.state, failed.attempts, failed.reason)
        assert "PatientBirthDate" in (failed.reason or "") and "model crashed" not in (failed.reason or "")
        assert done.state == "done", done.reason
        outputs = {
            "api_jobs": _get(web, "/api/jobs"),
            "api_job": _get(web, f"/api/jobs/{failed.id}"),
            "api_series": _get(web, "/api/series"),
            "dashboard": _get(web, "/"),
            "job_page": _get(web, f"/jobs/{failed.id}"),
            "metrics": _get(web, "/metrics"),
            "cli_jobs": cli(node, "jobs").stdout,
            "cli_jobs_json": cli(node, "jobs", "--json").stdout,
            "cli_status": cli(node, "status").stdout,
        }
        assert "PatientBirthDate" in outputs["api_jobs"] and "PatientBirthDate" in outputs["cli_jobs"]
        catalog.close()
    finally:
        node.stop()
    outputs.update({p.name: p.read_text(errors="replace") for p in workdir.glob("*.log")})
    logs = "\n".join(v for k, v in outputs.items() if k.endswith(".log"))
    # The logs did capture the path: the job's failure and highdicom's person-name warning.
    assert "job_failed" in logs and "single component" in logs, logs[-3000:]
    outputs.update({p.name: p.read_bytes().decode("latin-1") for p in workdir.glob("node.db*")})
    leaks = sorted({(where, value) for where, text in outputs.items() for value in PHI if value in text})
    assert leaks == [], leaks


# -- item 9: one SOP Instance UID in two patients' series -------------------------------------


def test_duplicate_sop_instance_uid_in_another_series_is_refused(tmp_path: Path) -> None:
    """Patient B's series carries an instance whose SOP Instance UID is already stored in
    patient A's series: that C-STORE is answered 0xA900 with a comment, logged with both
    series, nothing is written; A's file and catalog row are untouched and both series are
    processed from their own files (A: 12 instances, B: 11)."""
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE

    from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets

    workdir = tmp_path / "node"
    # B arrives 11 of 12 (ImagesInAcquisition): a short incomplete grace, not the default 60 s.
    node = start_node(workdir, node_config(workdir, idle_seconds=0.5, rules=[rule("ct", "ct-tissue", [])],
                                           completion={"incomplete_grace_seconds": 0.5}))
    try:
        phantom = make_chest_phantom(ChestSpec(slices=12))
        a = slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="dup-a", patient_id="PAT-A"))
        b = slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="dup-b", patient_id="PAT-B"))
        stolen = str(a[5].SOPInstanceUID)
        b[-1].SOPInstanceUID = stolen  # the last slice: the 11 others stay a regular stack
        b[-1].file_meta.MediaStorageSOPInstanceUID = stolen
        a_files = write_datasets(a, tmp_path / "a")
        b_files = write_datasets(b, tmp_path / "b")
        storescu(node.port, a_files)
        a_uid, b_uid = str(a[0].SeriesInstanceUID), str(b[0].SeriesInstanceUID)
        spooled = workdir / "spool" / str(a[0].StudyInstanceUID) / a_uid / f"{stolen}.dcm"
        wait_until(spooled.exists, 30, what="A's instance spooled")
        original = spooled.read_bytes()

        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(procs.LOOPBACK, node.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        answers = {}
        try:
            for path in b_files:
                rsp = assoc.send_c_store(path)
                answers[path.stem] = (int(rsp.Status), str(rsp.get("ErrorComment", "")))
        finally:
            assoc.release()
        refused = {uid: answer for uid, answer in answers.items() if answer[0] != 0}
        assert refused == {stolen: (0xA900, "refused: duplicate sop instance")}, refused

        catalog = catalog_of(node)
        job_a = wait_job(node, catalog, a_uid, ("done", "failed"))
        job_b = wait_job(node, catalog, b_uid, ("done", "failed"))
        assert (job_a.state, job_b.state) == ("done", "done"), (job_a.reason, job_b.reason)
        assert spooled.read_bytes() == original
        assert not list((workdir / "spool").rglob(f"{b_uid}/{stolen}.dcm"))
        assert catalog.owner_of_instance(stolen) == (str(a[0].StudyInstanceUID), a_uid)
        paths_a, paths_b = catalog.series_paths(a_uid), catalog.series_paths(b_uid)
        assert len(paths_a) == 12 and spooled in paths_a and len(paths_b) == 11
        assert all(p.parent.name == b_uid for p in paths_b)
        catalog.close()
    finally:
        node.stop()
    logs = node.logs()
    assert "store_refused_duplicate_sop_instance" in logs
    line = next(x for x in logs.splitlines() if "store_refused_duplicate_sop_instance" in x)
    assert b_uid in line and a_uid in line and stolen in line, line


# -- item 14: readiness reflects what the workers see ------------------------------------------


def _readyz(web: int) -> dict[str, object]:
    code, body = _api(web, "GET", "/readyz")
    body["status"] = code
    return body


def test_readiness_fails_while_the_worker_cannot_open_the_broker(tmp_path: Path) -> None:
    """A worker whose embedded broker file cannot be opened (its path is a folder here) does not
    count as an inference worker: /readyz says 503 ``inference_worker`` while the node itself
    reaches the broker; a worker that can open it makes the node ready.  A broker file the node
    cannot open for writing fails ``broker`` (kombu opens SQLite lazily: a plain connection
    check passed)."""
    web = procs.free_port()
    workdir = tmp_path / "node"
    config = node_config(workdir, worker={"in_process": "no"},
                         web={"enabled": True, "host": procs.LOOPBACK, "port": web})
    node = start_node(workdir, config)
    try:
        unopenable = workdir / "not-a-file.db"
        unopenable.mkdir()
        node.start_worker("blind", extra_env={"DICOM_NODE_BROKER__URL": f"sqla+sqlite:///{unopenable}"})
        log = workdir / "worker-blind.log"
        wait_until(lambda: "worker_broker_unreachable" in log.read_text(errors="replace"), 60,
                   what="the blind worker's probe")
        time.sleep(6)  # more than a heartbeat interval
        body = _readyz(web)
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert body["status"] == 503 and body["failing"] == ["inference_worker"], body
        assert checks["broker"]["ok"] is True

        node.start_worker("good")
        body = wait_until(lambda: (b := _readyz(web))["status"] == 200 and b, 60, what="ready with a good worker")
        assert body["failing"] == []

        broker = workdir / "broker.db"
        broker.rename(workdir / "broker.db.moved")
        broker.mkdir()
        body = _readyz(web)
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert body["status"] == 503 and "broker" in body["failing"], body  # type: ignore[operator]
        assert "unable to open database file" in checks["broker"]["detail"]
    finally:
        node.stop()
