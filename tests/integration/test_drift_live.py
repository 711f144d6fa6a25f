"""Drift end to end: two synthetic scanners send CT series over C-STORE to a real node; one of
them changes its kernel and noise; the drift metric and alert fire for that scanner only.

storescu → ``dicom-node serve`` (embedded worker, ``ct-tissue``) → one drift observation per job
→ ``/api/drift``, ``/metrics`` and the dashboard panel (screenshot: docs/images/drift-panel.png, written
there only under DICOM_NODE_UPDATE_SCREENSHOTS=1, see tests/support/screenshots.py).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.drift.scanners import scanner_identity
from tests.conftest import require_playwright, require_tool
from tests.integration.test_end_to_end import storescu
from tests.support.node import node_config, start_node, wait_until
from tests.support.procs import free_port
from tests.support.screenshots import check_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Small and quick: 12 slices of 64 x 64.
SPEC = ChestSpec(rows=64, columns=64, slices=12, pixel_spacing=5.5, slice_spacing=15.0, lung_axes=(45.0, 60.0, 70.0))
STABLE = {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "Revolution", "StationName": "CT01",
          "ProtocolName": "Chest routine"}
SHIFTING = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force", "StationName": "CT02",
            "ProtocolName": "Thorax routine"}
PER_WINDOW = 3


def write_series(folder: Path, seed: str, scanner: dict[str, str], kernel: str, noise_hu: float) -> list[Path]:
    """One CT series from ``scanner`` reconstructed with ``kernel`` at ``noise_hu``."""
    phantom = make_chest_phantom(ChestSpec(**{**SPEC.__dict__, "noise_hu": noise_hu}))
    datasets = slice_datasets(phantom.hu, phantom.affine,
                              SeriesInfo(seed=seed, manufacturer=scanner["Manufacturer"],
                                         series_description=scanner["ProtocolName"]))
    for ds in datasets:
        ds.ManufacturerModelName = scanner["ManufacturerModelName"]
        ds.StationName = scanner["StationName"]
        ds.ProtocolName = scanner["ProtocolName"]
        ds.ConvolutionKernel = kernel
    return write_datasets(datasets, folder / seed)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - loopback test node
        body = r.read().decode()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def test_only_the_scanner_whose_input_shifted_drifts(tmp_path: Path, screenshots: Path) -> None:
    require_tool("storescu")
    require_tool("chromium")
    sync_playwright = require_playwright()
    web_port = free_port()
    config = node_config(
        tmp_path, idle_seconds=1.0,
        rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"]}],
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
        drift={"baseline_jobs": PER_WINDOW, "window_jobs": PER_WINDOW, "min_window_jobs": PER_WINDOW,
               "bins": 4, "psi_alert": 0.25},
    )
    node = start_node(tmp_path / "node", config)
    base = f"http://127.0.0.1:{web_port}"
    try:
        def done(n: int) -> bool:
            return sum(1 for j in get(f"{base}/api/jobs?state=done")) >= n

        # Baseline: both scanners as usual (the same phantom and noise: identical inputs).
        first = []
        for i in range(PER_WINDOW):
            first += write_series(tmp_path / "in", f"stable-{i}", STABLE, "STANDARD", 10.0)
            first += write_series(tmp_path / "in", f"shifting-{i}", SHIFTING, "B30f", 10.0)
        storescu(node.port, first)
        wait_until(lambda: done(2 * PER_WINDOW), 240, what="baseline jobs done")
        # Recent: the second scanner now reconstructs with a sharp kernel: much more noise.
        second = []
        for i in range(PER_WINDOW):
            second += write_series(tmp_path / "in", f"stable-r{i}", STABLE, "STANDARD", 10.0)
            second += write_series(tmp_path / "in", f"shifting-r{i}", SHIFTING, "Br64", 60.0)
        storescu(node.port, second)
        wait_until(lambda: done(4 * PER_WINDOW), 240, what="recent jobs done")

        drift = get(f"{base}/api/drift")
        pairs = {p["scanner"]: p for p in drift["pairs"]}
        stable, shifting = scanner_identity(STABLE).label, scanner_identity(SHIFTING).label
        assert set(pairs) == {stable, shifting}, drift
        assert (pairs[stable]["status"], pairs[shifting]["status"]) == ("stable", "drift"), drift
        assert drift["alerts"] == 1 and pairs[shifting]["alert"] and not pairs[stable]["alert"]
        assert (pairs[shifting]["baseline_jobs"], pairs[shifting]["recent_jobs"]) == (PER_WINDOW, PER_WINDOW)
        psis = {f["feature"]: f["psi"] for f in pairs[shifting]["features"]}
        assert psis["input.kernel"] > 0.25 and psis["input.noise"] > 0.25, psis
        assert psis["input.kvp"] == 0.0 and psis["input.pixel_spacing"] == 0.0
        # The noisier images move what ct-tissue says too (its volumes).
        assert any(v > 0.25 for k, v in psis.items() if k.startswith("output.volume_ml.")), psis
        assert max(f["psi"] for f in pairs[stable]["features"]) == 0.0
        # No patient data in the answer.
        assert "Phantom" not in json.dumps(drift) and "PHANTOM" not in json.dumps(drift)

        families = {f.name: f for f in text_string_to_metric_families(get(f"{base}/metrics"))}
        alert = {s.labels["scanner"]: s.value for s in families["dicom_node_drift_alert"].samples}
        assert alert == {stable: 0.0, shifting: 1.0}
        kernel = {s.labels["scanner"]: s.value for s in families["dicom_node_drift_psi"].samples
                  if s.labels["feature"] == "input.kernel"}
        assert kernel[stable] == 0.0 and kernel[shifting] > 0.25
        seen = {s.labels["scanner"] for s in families["dicom_node_scanner_last_seen_timestamp"].samples}
        assert seen == {stable, shifting}

        screenshot_panel(sync_playwright, tmp_path, base, shifting, screenshots)
    except Exception:
        print(node.logs()[-6000:])
        raise
    finally:
        node.stop()


def screenshot_panel(sync_playwright: Any, tmp_path: Path, base: str, drifting: str, folder: Path) -> None:
    """The dashboard's drift panel in the Debian Chromium: the drifting row is highlighted."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"), executable_path=shutil.which("chromium"),
            headless=True, args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
            viewport={"width": 1500, "height": 1100})
        try:
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{base}/")
            page.wait_for_selector("#drift[data-loaded='yes']")
            row = page.locator(f"#drift-table tr[data-scanner='{drifting}']")
            assert "drift-alert" in (row.get_attribute("class") or "")
            assert row.locator("svg.drift-hist rect").count() > 0
            page.locator("#drift").screenshot(path=str(folder / "drift-panel.png"))
            check_png(folder / "drift-panel.png")
        finally:
            context.close()


def test_drift_catalog_on_postgresql() -> None:
    """The drift SQL (scanner cap, re-run upsert, windows, retention) on PostgreSQL too."""
    from dicom_node.catalog import Catalog
    from dicom_node.catalog.drift import OTHER, observations, prune_observations, record_observation
    from dicom_node.drift.monitor import evaluate
    from dicom_node.settings import DriftSettings
    from tests.conftest import require_postgres

    server = require_postgres()
    try:
        catalog = Catalog(server.create_database())
        t0 = 1_780_000_000.0
        labels = set()
        for i in range(30):
            scanner = scanner_identity({**STABLE, "StationName": f"CT{i % 3}"})
            labels.add(record_observation(
                catalog, model="m", series_instance_uid=f"1.2.{i}", job_id=i, at=t0 + i * 3600.0,
                seen_at=t0 + i * 3600.0, scanner=scanner,
                features={"input.kernel": "B30f" if i < 20 else "Br64", "input.kvp": 120.0}, max_scanners=2))
        record_observation(catalog, model="m", series_instance_uid="1.2.0", job_id=99, at=t0, seen_at=t0,
                           scanner=scanner_identity({**STABLE, "StationName": "CT0"}),
                           features={"input.kernel": "B30f", "input.kvp": 120.0}, max_scanners=2)
        assert OTHER in labels and len(labels) == 3 and len(observations(catalog)) == 30
        report = evaluate(catalog, DriftSettings(baseline_jobs=5, window_jobs=3, min_window_jobs=3), t0 + 30 * 3600.0)
        assert {p.scanner: p.status for p in report.pairs}[OTHER] == "drift"
        removed = prune_observations(catalog, cutoff=t0 + 20 * 3600.0, keep_first=5)
        # Per scanner (10 jobs each, every third hour): the first 5 are its baseline; of the rest,
        # those before hour 20 go: hours 15, 18 (CT0), 16, 19 (CT1), 17 (other).
        assert removed == 5 and len(observations(catalog)) == 25
        catalog.close()
    finally:
        server.drop_databases()
        server.stop()
