"""Issue 23: the dashboard's latency panel and ``/api/latency`` against a running node.

A real ``dicom-node serve`` (embedded broker and worker) receives three small CT series from
DCMTK ``storescu`` and sends SEG + SR to a DCMTK ``storescp``; then ``/api/latency``, the panel
in a headless Chromium and ``/metrics`` show, for the model, exactly the p50 / p95 that numpy
computes from the catalog's own timestamps (last instance received -> job done).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from dicom_node.catalog import Catalog, InstanceRow, JobRow
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.integration.test_dashboard_browser import ARTIFACTS, browser_page  # noqa: F401 - fixture
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERIES = 3


def end_to_end_from_catalog(catalog: Catalog) -> list[float]:
    """done_at - last instance of its series, for every done job, read straight from the tables."""
    with catalog.session() as s:
        out = []
        for job in s.scalars(select(JobRow).where(JobRow.state == "done")):
            last = s.scalar(select(func.max(InstanceRow.received_at))
                            .where(InstanceRow.series_instance_uid == job.series_instance_uid))
            assert job.done_at is not None and last is not None
            out.append(job.done_at - last)
        return out


def test_latency_panel_shows_the_catalogs_p50_p95(tmp_path: Path, browser_page: Any) -> None:  # noqa: F811
    require_tool("storescu", "storescp")
    phantom = make_chest_phantom(ChestSpec(slices=12))
    archive = procs.start_storescp(tmp_path / "archive")
    web_port = procs.free_port()
    config = node_config(
        tmp_path / "node",
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port,
                       "outputs": ["seg", "sr"]}],
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": ["archive"]}],
        web={"enabled": True, "host": procs.LOOPBACK, "port": web_port},
    )
    node = start_node(tmp_path / "node", config)
    catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}", create=False)
    try:
        for k in range(SERIES):  # with ImagesInAcquisition: complete at association release
            files = write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=f"latency{k}")),
                                   tmp_path / f"ct{k}")
            res = procs.run_tool(["storescu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port), *map(str, files)])
            assert res.returncode == 0, res.stderr
        wait_until(lambda: len(end_to_end_from_catalog(catalog)) == SERIES, 120, what="three jobs done")
        values = end_to_end_from_catalog(catalog)
        p50, p95 = (round(float(v), 3) for v in np.percentile(values, [50, 95]))

        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/api/latency", timeout=10) as reply:
            api = json.loads(reply.read())
        [model] = api["models"]
        assert (model["model"], model["jobs"]) == ("ct-tissue", SERIES)
        assert model["end_to_end"] == {"p50_s": p50, "p95_s": p95}
        assert model["stages"]["inference"]["p50_s"] > 0

        page = browser_page
        page.goto(f"http://{procs.LOOPBACK}:{web_port}/")
        row = page.locator('#latency-table tbody tr[data-model="ct-tissue"]')
        row.wait_for()
        assert row.locator('[data-field="jobs"]').inner_text() == str(SERIES)
        shown = row.locator('[data-field="e2e-p50"]')
        assert float(str(shown.get_attribute("data-value"))) == p50 and shown.inner_text() == f"{p50:.2f} s"
        shown = row.locator('[data-field="e2e-p95"]')
        assert float(str(shown.get_attribute("data-value"))) == p95 and shown.inner_text() == f"{p95:.2f} s"
        assert " / " in row.locator('[data-field="stage-inference"]').inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#latency").screenshot(path=str(ARTIFACTS / "latency-panel.png"))

        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        assert f'dicom_node_end_to_end_seconds_count{{model="ct-tissue"}} {float(SERIES)}' in metrics
    finally:
        catalog.close()
        node.stop()
        archive.stop()
