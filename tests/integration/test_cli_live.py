"""The ops CLI against a running node: `send` (with progress), `status`, `echo`, `jobs --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = pytest.mark.integration


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


@pytest.mark.slow
def test_send_status_echo_and_jobs_on_a_running_node(tmp_path: Path, storescp_archive: procs.Server) -> None:
    """`send DIR` feeds a folder to the node with a progress bar, `status` shows the listener
    answering, the worker alive and the job counts, `echo archive` reaches the archive, and
    `send DIR --to archive` delivers straight to it."""
    require_tool("storescp")
    phantom = make_chest_phantom(ChestSpec(slices=10, rows=48, columns=48, pixel_spacing=7.0))
    folder = tmp_path / "study"
    write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="cli-live")), folder / "ct")
    (folder / "README.txt").write_text("not DICOM, skipped")
    archive = {"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": storescp_archive.port}
    config = node_config(tmp_path / "node", destinations=[archive],
                         rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["foreground"],
                                 "destinations": ["archive"]}])
    node = start_node(tmp_path / "node", config)
    try:
        sent = cli(node.config_path, "send", str(folder), "--batch", "4", "--progress")
        assert sent.returncode == 0, sent.stderr
        assert "sent 10 files to DICOM_NODE@127.0.0.1" in sent.stdout
        assert "] 10/10" in sent.stderr and "] 4/10" in sent.stderr  # the progress bar advanced per batch

        def done() -> list[dict[str, object]] | None:
            jobs = json.loads(cli(node.config_path, "jobs", "--json").stdout)
            return jobs if jobs and jobs[0]["state"] == "done" else None

        jobs = wait_until(done, 90, what="the job to be done")
        assert jobs[0]["model"] == "foreground"

        status = cli(node.config_path, "status", "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["listener"]["answers_echo"] is True
        assert data["jobs_by_state"] == {"done": 1}
        assert any(w["alive"] and "inference" in w["queues"] for w in data["workers"])
        assert data["disk"]["accepting"] is True and data["recent_failures"] == []
        text = cli(node.config_path, "status").stdout
        assert "answers C-ECHO" in text and "done 1" in text

        assert cli(node.config_path, "echo", "archive").returncode == 0
        direct = cli(node.config_path, "send", str(folder), "--to", "archive", "--json")
        assert direct.returncode == 0 and json.loads(direct.stdout) == {"destination": "archive", "sent": 10,
                                                                         "total": 10}
    finally:
        node.stop()
    down = cli(node.config_path, "status")
    assert down.returncode == 1 and "NOT ANSWERING" in down.stdout


def test_status_lists_the_rejected_associations(tmp_path: Path) -> None:
    """`status` shows the listener's recent rejections, as the dashboard's panel does (from the
    running `serve`'s web API: they live in its memory): grouped by calling AE, peer and reason,
    with a count and the last time, in the text and in `--json`; with the web server off it
    says they are unknown and where to look instead."""
    from pynetdicom import AE

    web_port = procs.free_port()
    # DICOM_NODE: `status` probes the listener with C-ECHO under the node's own AE title (left
    # out, the probe is rejected: test_status_counts_a_listener_that_rejects_its_probe_as_up).
    config = node_config(tmp_path / "node", listener={"allowed_calling_ae_titles": ["PACS", "DICOM_NODE"]},
                         web={"enabled": True, "host": procs.LOOPBACK, "port": web_port})
    node = start_node(tmp_path / "node", config)
    try:
        procs.wait_for_port(web_port, timeout=30, proc=node.server.proc)
        started = time.time()

        def associate(calling: str, called: str) -> None:
            ae = AE(calling)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate(procs.LOOPBACK, node.port, ae_title=called)
            assert assoc.is_rejected, f"{calling} -> {called} was not rejected"

        associate("INTRUDER", "DICOM_NODE")
        associate("INTRUDER", "DICOM_NODE")
        associate("PACS", "WRONG_AE")

        status = cli(node.config_path, "status", "--json")
        assert status.returncode == 0, status.stderr
        rejected = json.loads(status.stdout)["rejected_associations"]
        assert rejected["error"] is None and rejected["total"] == 3 and rejected["kept"] == 50
        assert rejected["source"] == f"http://{procs.LOOPBACK}:{web_port}/api/rejected-associations"
        groups = {(g["calling_ae_title"], g["called_ae_title"]): g for g in rejected["groups"]}
        assert set(groups) == {("INTRUDER", "DICOM_NODE"), ("PACS", "WRONG_AE")}
        intruder, wrong = groups["INTRUDER", "DICOM_NODE"], groups["PACS", "WRONG_AE"]
        assert intruder["count"] == 2 and intruder["peer_host"] == procs.LOOPBACK
        assert intruder["reason"] == "calling AE title not recognized"
        assert wrong["count"] == 1 and wrong["reason"] == "called AE title not recognized"
        assert rejected["groups"][0] == wrong  # newest first
        assert started - 1 <= intruder["last_at"] <= wrong["last_at"]

        text = cli(node.config_path, "status").stdout
        assert "rejected  3 since the node started" in text, text
        [line] = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("INTRUDER from")]
        assert line.startswith(f"INTRUDER from {procs.LOOPBACK} calling DICOM_NODE: "
                               "calling AE title not recognized, 2 times, last 20"), line
        assert line.endswith(" UTC")
        assert f"PACS from {procs.LOOPBACK} calling WRONG_AE: called AE title not recognized, 1 time, last" in text
    finally:
        node.stop()

    off = node_config(tmp_path / "quiet")  # web disabled, as node_config writes it
    node = start_node(tmp_path / "quiet", off)
    try:
        data = json.loads(cli(node.config_path, "status", "--json").stdout)["rejected_associations"]
        assert data == {"source": None, "error": "[web] enabled = false: they are shown through serve's web API"}
        text = cli(node.config_path, "status").stdout
        assert ("rejected  unknown ([web] enabled = false: they are shown through serve's web API); "
                "the log's association_rejected lines have them") in text
    finally:
        node.stop()


def test_status_counts_a_listener_that_rejects_its_probe_as_up(tmp_path: Path) -> None:
    """With an allow-list that leaves out the node's own AE title, the listener rejects
    `status`'s C-ECHO probe: that answer proves it is up, so `status` says so and exits 0; a
    stopped node is still NOT ANSWERING (exit 1)."""
    config = node_config(tmp_path / "node", listener={"allowed_calling_ae_titles": ["PACS"]})
    node = start_node(tmp_path / "node", config)
    try:
        status = cli(node.config_path, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        listener = json.loads(status.stdout)["listener"]
        assert listener["probe"] == "rejected" and listener["answers_echo"] is None
        assert "rejected the association" in listener["probe_detail"]
        assert "calling ae title not recogni" in listener["probe_detail"]  # pynetdicom: "recognised"
        text = cli(node.config_path, "status")
        assert text.returncode == 0
        assert "up, but rejected this probe from DICOM_NODE" in text.stdout, text.stdout
    finally:
        node.stop()
    down = cli(node.config_path, "status", "--json")
    assert down.returncode == 1
    assert json.loads(down.stdout)["listener"]["probe"] == "down"
