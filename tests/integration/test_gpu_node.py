"""Warm models and peak memory in a real node: ``dicom-node serve`` with its worker, a CT sent
with storescu, then what ``/api/jobs`` and ``/api/models`` say about the run."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.integration.test_end_to_end import storescu
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

# A node start, one small CT and a few API reads: 24 s measured at load average 8.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{port}{path}", timeout=30) as reply:
        return json.loads(reply.read())


def test_job_records_peak_memory_and_models_show_warm_or_cold(tmp_path: Path) -> None:
    """With ``max_warm_models = 1`` and two rules (ct-tissue for CT, foreground for MR), the
    worker loads ct-tissue at start and leaves foreground cold; the CT job finds its model warm,
    records its peak memory (a CPU worker: the resident growth of the run), and /api/models
    shows ct-tissue warm on the worker's process and foreground cold."""
    phantom = make_chest_phantom(ChestSpec(slices=12, rows=64, columns=64))
    info = SeriesInfo(seed="gpu-node")
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "ct")
    web_port = procs.free_port()
    config = node_config(
        tmp_path / "node",
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"]},
               {"name": "mr", "match": {"Modality": "MR"}, "models": ["foreground"]}],
        web={"enabled": True, "host": procs.LOOPBACK, "port": web_port},
        worker={"device": "cpu", "max_warm_models": 1},
    )
    node = start_node(tmp_path / "node", config)
    try:
        storescu(node.port, files)

        def finished() -> dict[str, Any] | None:
            jobs = get(web_port, "/api/jobs")
            done = [j for j in jobs if j["state"] in ("done", "failed")]
            return done[0] if done else None

        try:
            job = wait_until(finished, 120, what="the CT job done")
        except TimeoutError:
            pytest.fail(f"the job did not finish; node logs:\n{node.logs()[-6000:]}")
        assert job["state"] == "done", job["reason"]
        detail = get(web_port, f"/api/jobs/{job['id']}")
        memory = detail["peak_memory"]
        assert memory["device"] == "cpu" and memory["kind"] in ("rss", "rss_lifetime")
        if memory["kind"] == "rss":  # Linux: reset per job, so the run's own arrays show
            assert memory["peak_bytes"] > 0
        assert detail["results"]["memory"] == memory
        assert detail["model_warm"] is True  # loaded at worker start, not by the job

        def warm_listed() -> dict[str, Any] | None:
            models = {m["name"]: m for m in get(web_port, "/api/models")}
            return models if models["ct-tissue"]["warm"] else None

        models = wait_until(warm_listed, 30, what="ct-tissue warm in /api/models")
        (where,) = models["ct-tissue"]["warm_on"]
        assert where["device"] == "cpu" and where["version"] == "1.0.0" and where["uses"] >= 2
        assert models["foreground"]["warm"] is False and models["foreground"]["warm_on"] == []
        assert models["ct-lung-nodules"]["warm"] is False
        workers = get(web_port, "/api/queue")["workers"]
        assert [w["warm_models"] for w in workers if w["pid"] == where["pid"]] == [["ct-tissue"]]
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/jobs/{job['id']}", timeout=30) as reply:
            assert 'id="job-peak-memory"' in reply.read().decode()
    finally:
        node.stop()
