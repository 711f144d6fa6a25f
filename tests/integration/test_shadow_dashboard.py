"""The shadow panel of the dashboard in a real headless Chromium: shadow model vs live model
with the figures of /api/shadow, the per-series list, and shadow jobs labelled ``done (shadow)``.
Takes the screenshot docs/models.md shows (docs/images/shadow-panel.png: written there only under
DICOM_NODE_UPDATE_SCREENSHOTS=1, see tests/support/screenshots.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.catalog import Catalog
from dicom_node.scheduling.completion import CompletionLoop
from dicom_node.shadow import compare_pending
from dicom_node.web import WebServer, create_app
from inference.prediction import ANATOMICAL_STRUCTURE, LUNG, Label, Prediction, Segment
from inference.volume import Volume
from tests.integration.test_dashboard_browser import browser_page  # noqa: F401  (fixture)
from tests.support.queues import MemoryQueue
from tests.support.screenshots import check_png
from tests.unit.test_catalog import inst
from tests.unit.test_shadow import SHAPE, _box, _finish, _settings

pytestmark = pytest.mark.integration


def test_shadow_panel_shows_the_comparison_and_shadow_jobs(tmp_path: Path, browser_page: Any,  # noqa: F811
                                                           screenshots: Path) -> None:
    settings, _ = _settings(tmp_path)
    catalog = Catalog(settings.database.url)
    volume = Volume(np.zeros(SHAPE, np.float32), np.eye(4), "CT")
    lab = Label("lungs", ANATOMICAL_STRUCTURE, LUNG)
    live_mask = _box(slice(0, 4), slice(0, 10), slice(0, 10))
    for i, shift in enumerate((0, 1, 2)):
        series = f"1.2.3.4.{i + 1}"
        catalog.record_instances([inst(1, 100.0 + i, series=series)])
        CompletionLoop(settings, catalog, MemoryQueue()).tick(now=110.0 + i)
        jobs = {j.model: j for j in catalog.list_jobs() if j.series_instance_uid == series}
        shadow_mask = _box(slice(shift, 4 + shift), slice(0, 10), slice(0, 10))
        _finish(catalog, jobs["foreground"].id, settings.outbox,
                Prediction("foreground", "2.0", [Segment(lab, shadow_mask)]), volume)
        _finish(catalog, jobs["ct-tissue"].id, settings.outbox,
                Prediction("ct-tissue", "1.0", [Segment(lab, live_mask)]), volume)
    assert compare_pending(catalog, settings.outbox) == 3
    expected = np.mean([1.0, 0.75, 0.5])  # 4-slice boxes shifted by 0, 1, 2 slices
    server = WebServer(create_app(settings, catalog, MemoryQueue()), "127.0.0.1", 0)
    server.start()
    page = browser_page
    try:
        page.goto(server.url + "/")
        row = page.locator("#shadow-table tbody tr", has_text="foreground")
        row.wait_for()
        cells = row.locator("td").all_inner_texts()
        assert cells[:4] == ["foreground", "ct-tissue", "3", f"{expected:.3f}"]
        assert cells[5] == "1.000"  # neither found a lesion
        assert page.locator("#shadow-empty").is_hidden()
        page.locator("#shadow-series-box summary").click()
        assert page.locator("#shadow-series tbody tr").count() == 3
        badges = page.locator("#jobs-table .state-shadow")
        badges.first.wait_for()
        assert set(badges.all_inner_texts()) == {"done (shadow)"} and badges.count() == 3
        page.locator("#shadow-panel").screenshot(path=str(screenshots / "shadow-panel.png"))
        check_png(screenshots / "shadow-panel.png")
    finally:
        server.stop()
        catalog.close()
