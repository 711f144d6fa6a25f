"""Routing priority with a real Redis broker: an urgent job overtakes normal ones already queued."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_urgent_job_overtakes_queued_normal_jobs(tmp_path: Path, redis_server: procs.Server) -> None:
    """Three routine series are queued before an urgent one while no worker runs; the worker
    that then starts runs the urgent job first."""
    require_tool("storescu")
    phantom = make_chest_phantom(ChestSpec(slices=8, rows=48, columns=48, pixel_spacing=7.0))
    rules = [
        {"name": "stroke", "match": {"SeriesDescription": "/urgent/"}, "models": ["foreground"], "priority": "urgent"},
        {"name": "routine", "match": {"SeriesDescription": "/routine/"}, "models": ["foreground"]},
    ]
    config = node_config(tmp_path / "node", broker_url=redis_server.extra["url"], rules=rules,
                         worker={"in_process": "no"})
    node = start_node(tmp_path / "node", config)
    catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}")
    try:
        order = ["routine 1", "routine 2", "routine 3", "urgent"]
        for i, description in enumerate(order):
            info = SeriesInfo(seed=f"priority-{i}", series_description=description)
            files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / f"s{i}")
            res = procs.run_tool(["storescu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port), *map(str, files)])
            assert res.returncode == 0, res.stderr
            wait_until(lambda n=i + 1: len([j for j in catalog.list_jobs() if j.state == "queued"]) == n, 30,
                       what=f"{i + 1} queued jobs")
        node.start_worker("w1")
        jobs = wait_until(lambda: (js := catalog.list_jobs()) and all(j.state == "done" for j in js) and js, 120,
                          what="all jobs done")
        by_start = sorted(jobs, key=lambda j: j.running_at or 0.0)
        assert by_start[0].rule == "stroke" and by_start[0].priority == "urgent", [j.rule for j in by_start]
        assert [j.rule for j in by_start[1:]] == ["routine"] * 3
    finally:
        node.stop()
