"""Prefetch in a real worker: a Celery pool process of ``dicom-node serve`` (embedded broker)
loads the next queued series while the current job's model runs, and the results are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.integration.test_end_to_end import SEG_CLASS, SR_CLASS, archived, destination, storescu
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = pytest.mark.integration

SERIES = 4


@pytest.mark.slow
def test_worker_prefetches_queued_series(tmp_path: Path, storescp_archive: procs.Server) -> None:
    """Four series sent in one association queue four jobs at once: all are delivered, later
    jobs take the volume their worker prefetched, and the worker logged each prefetch."""
    require_tool("storescu")
    phantom = make_chest_phantom(ChestSpec())
    files: list[Path] = []
    for i in range(SERIES):
        info = SeriesInfo(seed=f"prefetch-{i}")
        files += write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / f"ct{i}")
    rules = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": ["archive"]}]
    node = start_node(tmp_path / "node", node_config(tmp_path / "node", destinations=[destination(storescp_archive)],
                                                     rules=rules, worker={"prefetch": True}))
    catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}")
    try:
        storescu(node.port, files)

        def settled() -> list[object] | None:
            jobs = catalog.list_jobs()
            return jobs if len(jobs) == SERIES and all(j.state in ("done", "failed") for j in jobs) else None

        try:
            jobs = wait_until(settled, 180, what="all jobs settled")
        except TimeoutError:
            pytest.fail(f"jobs did not settle; node logs:\n{node.logs()[-8000:]}")
        assert [j.state for j in jobs] == ["done"] * SERIES, [j.reason for j in jobs]
        prefetched = [j.results["timings"]["prefetched"] for j in sorted(jobs, key=lambda j: j.running_at)]
        assert prefetched[0] is False  # nothing was queued before the first job
        assert any(prefetched[1:]), prefetched
        got = archived(storescp_archive)
        assert len(got.get(SEG_CLASS, [])) == SERIES and len(got.get(SR_CLASS, [])) == SERIES
        events = [json.loads(line) for line in node.logs().splitlines() if line.startswith("{")]
        assert sum(e.get("event") == "series_prefetched" for e in events) >= sum(prefetched)
        started = next(e for e in events if e.get("event") == "node_started")
        assert started["frozen_objects"] > 10_000  # start-up's heap is out of full collections
    finally:
        catalog.close()
        node.stop()
