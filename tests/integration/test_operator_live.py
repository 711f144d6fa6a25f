"""Operator actions against a running node: a series no rule matches is listed with the rule keys
that decided, a re-send of stored instances is logged and starts nothing, `reprocess` applies a
rule added later, `resend` re-delivers the stored results (also to another destination),
`retry` on a done job re-delivers, `rerun --model` runs a new generation; each one audited;
after `gc` removed every job, job ids do not start again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = pytest.mark.integration


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def stores(archive: procs.Server) -> int:
    """C-STOREs storescp (-v) accepted so far (re-sends of the same object included)."""
    return archive.log_text().count("storing DICOM file")


def log_events(node_log: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in node_log.splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


@pytest.mark.slow
def test_unmatched_resend_reprocess_retry_rerun(tmp_path: Path) -> None:
    require_tool("storescp")
    phantom = make_chest_phantom(ChestSpec(slices=10, rows=48, columns=48, pixel_spacing=7.0))
    info = SeriesInfo(seed="operator-live")
    folder = tmp_path / "study"
    write_datasets(slice_datasets(phantom.hu, phantom.affine, info), folder)
    series_uid, study_uid = info.uid("series"), info.uid("study")
    archive = procs.start_storescp(tmp_path / "archive", extra_args=["-v"])
    second = procs.start_storescp(tmp_path / "second", ae_title="SECOND", extra_args=["-v"])
    dests = [{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port},
             {"name": "second", "ae_title": "SECOND", "host": procs.LOOPBACK, "port": second.port}]
    mr_only = {"name": "mr-only", "match": {"Modality": "MR"}, "models": ["foreground"], "destinations": ["archive"]}
    workdir = tmp_path / "node"
    node = start_node(workdir, node_config(workdir, destinations=dests, rules=[mr_only]))
    catalog = Catalog(f"sqlite:///{workdir / 'node.db'}")
    try:
        assert cli(node.config_path, "send", str(folder)).returncode == 0
        wait_until(lambda: (s := catalog.get_series(series_uid)) is not None and s.state == "complete", 60,
                   what="the series to complete")
        # 22.3: the unmatched series is visible, with the rule key that decided.
        listed = cli(node.config_path, "series", "--unmatched", "--json")
        assert listed.returncode == 0, listed.stderr
        [entry] = json.loads(listed.stdout)
        assert entry["series_instance_uid"] == series_uid and entry["instances"] == 10
        assert entry["routing"] == ["mr-only: Modality='CT' != 'MR'"]
        text = cli(node.config_path, "series", "--unmatched").stdout
        assert series_uid in text and "mr-only: Modality='CT' != 'MR'" in text
        assert "1 series matched no rule" in cli(node.config_path, "jobs").stdout
        status = json.loads(cli(node.config_path, "status", "--json").stdout)
        assert status["unmatched_series"] == 1
        assert "unmatched 1 series" in cli(node.config_path, "status").stdout

        # 22.2: the same instances again: logged once for the association, no job.
        assert cli(node.config_path, "send", str(folder)).returncode == 0
        again = wait_until(lambda: log_events(node.logs(), "instances_already_stored"), 30,
                           what="the already-stored log line")
        assert again[0]["count"] == 10 and again[0]["series_instance_uid"] == series_uid
        assert "10 already-stored instances ignored" in again[0]["message"]
        assert catalog.list_jobs() == []
    finally:
        node.stop()

    # A CT rule is added; the node restarts with it; `reprocess STUDY` applies it.
    ct = {"name": "ct", "match": {"Modality": "CT"}, "models": ["foreground"], "destinations": ["archive"]}
    node = start_node(workdir, node_config(workdir, port=node.port, destinations=dests, rules=[mr_only, ct]))
    try:
        res = cli(node.config_path, "reprocess", study_uid)
        assert res.returncode == 0, res.stderr
        assert f"series {series_uid}: generation 2" in res.stdout

        def job_done(job_id: int) -> Any:
            job = catalog.get_job(job_id)
            return job if job is not None and job.state in ("done", "failed") else None

        [job] = catalog.list_jobs()
        job = wait_until(lambda: job_done(job.id), 90, what="the reprocessed job")
        assert job.state == "done" and job.generation == 2 and job.rule == "ct", job.reason
        assert "reprocess by operator (cli): rules re-evaluated" in (catalog.job_events(job.id)[0].detail or "")
        n = len(job.results["files"])  # the destination's output profile: SEG, SR, GSPS, KOS, SC
        assert n >= 2 and stores(archive) == n
        assert cli(node.config_path, "series", "--unmatched", "--json").stdout.strip() == "[]"

        # 22.1: resend re-delivers the stored files without running the model, also elsewhere.
        res = cli(node.config_path, "resend", series_uid, "--to", "second")
        assert res.returncode == 0 and "queued for delivery to second" in res.stdout, res.stderr
        wait_until(lambda: stores(second) == n and job_done(job.id), 60, what="the resend to second")
        res = cli(node.config_path, "resend", str(job.id))
        assert res.returncode == 0, res.stderr
        wait_until(lambda: stores(archive) == 2 * n and stores(second) == 2 * n and job_done(job.id), 60,
                   what="the resend to both destinations")
        # retry of a done job: the stored results again (never a silent model run).
        res = cli(node.config_path, "retry", str(job.id))
        assert res.returncode == 0 and "stored results sent again" in res.stdout, res.stdout + res.stderr
        wait_until(lambda: stores(archive) == 3 * n and job_done(job.id), 60, what="the retried delivery")
        events = catalog.job_events(job.id)
        assert [e.state for e in events].count("running") == 1
        details = [e.detail or "" for e in events]
        assert "resend by operator (cli) to second" in details
        assert "resend by operator (cli) to archive, second" in details
        assert any(d.startswith("retried by operator (cli)") for d in details)
        assert "second" in catalog.get_job(job.id).destinations  # type: ignore[union-attr]

        # 21.4: rerun one model as a new generation, audited.
        res = cli(node.config_path, "rerun", series_uid, "--model", "foreground", "--json")
        assert res.returncode == 0, res.stderr
        [new_id] = json.loads(res.stdout)["jobs"]
        new = wait_until(lambda: job_done(new_id), 90, what="the re-run job")
        assert new.state == "done" and new.generation == 3 and new_id > job.id, new.reason
        assert catalog.job_events(new_id)[0].detail == "rule ct; rerun by operator (cli)"
        assert stores(archive) == 4 * n and stores(second) == 3 * n

        # Refusals say why and exit 1.
        bad = cli(node.config_path, "resend", "4711")
        assert bad.returncode == 1 and "unknown job 4711" in bad.stderr
        bad = cli(node.config_path, "resend", str(job.id), "--to", "nowhere")
        assert bad.returncode == 2 and "configured destinations: archive, second" in bad.stderr
        bad = cli(node.config_path, "rerun", series_uid, "--model", "no-such-model")
        assert bad.returncode == 1 and "no job and no routing rule names model 'no-such-model'" in bad.stderr

        # 22.12: gc removes every job; the next job's id is above every id used before.
        used = max(j.id for j in catalog.list_jobs())
        gc = cli(node.config_path, "gc", "--older-than-days", "0.00001", "--json")
        assert gc.returncode == 0 and json.loads(gc.stdout)["jobs"] == 2, gc.stdout + gc.stderr
        assert catalog.list_jobs() == [] and catalog.get_series(series_uid) is None
        assert cli(node.config_path, "send", str(folder)).returncode == 0
        fresh = wait_until(lambda: catalog.list_jobs(), 60, what="a job for the series sent after gc")
        assert fresh[0].id > used, (fresh[0].id, used)

        # 22.13: an operator's log: no Celery banner, no highdicom or alembic INFO chatter.
        logs = node.logs()
        assert "celery@" in logs and " ready." in logs  # the worker did start and say so
        assert "-------------- celery@" not in logs and "[config]" not in logs
        assert "-related attributes from dataset" not in logs and "copy attributes of module" not in logs
        assert "Context impl" not in logs and "Will assume" not in logs
    finally:
        node.stop()
        archive.stop()
        second.stop()
