"""Drift monitoring: PSI maths, windows, scanners, many observations through the real catalog.

The many-observations cases call the catalog and monitor functions directly (thousands of jobs
in a second); ``tests/integration/test_drift_live.py`` drives a real node end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.catalog import Catalog
from dicom_node.catalog.drift import OTHER, observation_version, observations, record_observation, scanners
from dicom_node.drift import psi
from dicom_node.drift.features import input_features, noise_estimate, output_features
from dicom_node.drift.monitor import DriftMonitor, evaluate, split_windows
from dicom_node.drift.prometheus import DriftCollector
from dicom_node.drift.scanners import normalise_protocol, scanner_identity
from dicom_node.retention import collect_garbage
from dicom_node.settings import DriftSettings, load_settings
from inference.prediction import Label, Prediction, Segment
from inference.volume import Volume

DAY = 86400.0
T0 = 1_780_000_000.0
GE = {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "Revolution", "StationName": "CT01",
      "ProtocolName": "Chest 1.25mm"}
SIEMENS = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force", "StationName": "CTAWP99",
           "ProtocolName": "Thorax Routine"}


# -- PSI maths ---------------------------------------------------------------------------------


def test_psi_of_identical_histograms_is_zero_and_grows_with_the_shift() -> None:
    assert psi.psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0, abs=1e-12)
    small = psi.psi([50, 50], [55, 45])
    large = psi.psi([50, 50], [90, 10])
    # By hand, with 0.5 added to every count: shares 0.5 / 0.5 against 55.5/101 and 45.5/101.
    r1, r2 = 55.5 / 101, 45.5 / 101
    assert small == pytest.approx((r1 - 0.5) * math.log(r1 / 0.5) + (r2 - 0.5) * math.log(r2 / 0.5))
    assert 0 < small < 0.1 < 0.25 < large


def test_psi_smooths_empty_bins_instead_of_dividing_by_zero() -> None:
    value = psi.psi([100, 0], [0, 100])
    assert math.isfinite(value) and value > 10


def test_quantile_edges_make_equal_count_bins_and_merge_ties() -> None:
    values = list(range(1000))
    edges = psi.quantile_edges(values, 10)
    assert len(edges) == 10 and edges[0] == 0
    assert psi._counts(values, edges, 999) == [0] + [100] * 10 + [0]
    assert psi._counts([-5, 1000], edges, 999) == [1] + [0] * 10 + [1]
    assert psi.quantile_edges([120.0] * 50, 10) == [120.0]


def test_numeric_psi_small_for_the_same_distribution_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    baseline = rng.normal(10, 2, 500).tolist()
    same = psi.numeric(baseline, rng.normal(10, 2, 300).tolist(), 10)
    shifted = psi.numeric(baseline, rng.normal(13, 2, 300).tolist(), 10)
    assert same.psi < 0.1
    # Chance alone, 500 against 300 jobs, 10 bins: about (bins - 1) * (1/500 + 1/300) = 0.048,
    # plus ~0.015 for the recent values beyond the baseline's range: far below the 0.25 alert
    # (docs/models.md quotes these figures).
    chance = [psi.numeric(rng.normal(10, 2, 500).tolist(), rng.normal(10, 2, 300).tolist(), 10).psi
              for _ in range(100)]
    assert 0.04 < float(np.mean(chance)) < 0.08 and max(chance) < 0.25
    assert shifted.psi > 0.25
    assert len(same.bins) == 12 and sum(same.baseline) == pytest.approx(1.0, abs=1e-3)


def test_constant_numeric_feature_is_stable_until_it_changes() -> None:
    assert psi.numeric([120.0] * 40, [120.0] * 30).psi == pytest.approx(0.0, abs=0.01)
    assert psi.numeric([120.0] * 40, [100.0] * 30).psi > 5
    assert psi.numeric([120.0] * 40, [140.0] * 30).psi > 5
    assert psi.numeric([120.0] * 40, [120.0] * 30).bins == ["< 120", "120", "> 120"]


def test_categorical_psi_by_category() -> None:
    same = psi.categorical(["B30f"] * 80 + ["B45f"] * 20, ["B30f"] * 40 + ["B45f"] * 10)
    new_kernel = psi.categorical(["B30f"] * 100, ["B30f"] * 20 + ["Br64"] * 30)
    assert same.psi == pytest.approx(0.0, abs=1e-3)
    assert new_kernel.bins == ["B30f", "Br64"] and new_kernel.psi > 1


def test_categorical_folds_rare_categories() -> None:
    many = [f"K{i}" for i in range(40)]
    dist = psi.categorical(many, many)
    assert len(dist.bins) == psi.MAX_CATEGORIES + 1 and dist.bins[-1] == "(other)"


# -- scanners ------------------------------------------------------------------------------------


def test_scanner_identity_normalises_protocol_and_labels_shortly() -> None:
    a = scanner_identity(GE)
    b = scanner_identity({**GE, "ProtocolName": "CHEST 2.5 mm"})
    c = scanner_identity({**GE, "StationName": "CT02"})
    assert normalise_protocol("Chest 1.25mm") == "chest mm"
    assert a.key == b.key and a.key != c.key
    assert a.label.startswith("CT01-") and len(a.label) <= 20
    assert scanner_identity({**GE, "ProtocolName": None, "SeriesDescription": "Chest 3mm"}).protocol == "chest mm"
    anonymous = scanner_identity({})
    assert anonymous.label.startswith("unknown-")


def test_scanners_past_the_cap_are_counted_as_other(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    labels = []
    for i in range(5):
        scanner = scanner_identity({**GE, "StationName": f"CT{i:02d}"})
        labels.append(record_observation(catalog, model="m", series_instance_uid=f"1.2.{i}", job_id=i, at=T0 + i,
                                         seen_at=T0 + i, scanner=scanner, features={}, max_scanners=3))
    assert labels[:3] == [scanner_identity({**GE, "StationName": f"CT{i:02d}"}).label for i in range(3)]
    assert labels[3:] == [OTHER, OTHER]
    assert [r.label for r in scanners(catalog)] == [*labels[:3], OTHER]


def test_two_scanners_never_share_a_label(tmp_path: Path) -> None:
    from dicom_node.catalog.drift import ScannerIdentity

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    a = ScannerIdentity(key="a" * 40, label="CT01-aaaaaa")
    b = ScannerIdentity(key="aaaaaa" + "b" * 34, label="CT01-aaaaaa")
    labels = [record_observation(catalog, model="m", series_instance_uid=f"1.{i}", job_id=i, at=T0, seen_at=T0,
                                 scanner=sc, features={}, max_scanners=5) for i, sc in enumerate((a, b))]
    assert labels == ["CT01-aaaaaa", "CT01-aaaaaabbbbbb"]


def test_a_rerun_replaces_its_observation(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    scanner = scanner_identity(GE)
    for job_id, findings in ((1, 0), (2, 3)):
        record_observation(catalog, model="m", series_instance_uid="1.2.3", job_id=job_id, at=T0, seen_at=T0,
                           scanner=scanner, features={"output.findings": findings}, max_scanners=5)
    (only,) = observations(catalog)
    assert only.features == {"output.findings": 3}
    assert observation_version(catalog)[1] == 1


# -- features ------------------------------------------------------------------------------------


def test_noise_estimate_follows_the_noise_not_the_edges() -> None:
    rng = np.random.default_rng(0)
    flat = np.zeros((10, 64, 64), np.float32)
    flat[:, :, 32:] = 1000.0  # a strong edge
    for sigma in (5.0, 40.0):
        noisy = flat + rng.normal(0, sigma, flat.shape).astype(np.float32)
        assert noise_estimate(noisy) == pytest.approx(sigma, rel=0.1)


def test_features_of_a_job() -> None:
    affine = np.diag([2.5, 0.7, 0.7, 1.0])
    volume = Volume(np.zeros((4, 8, 8), np.float32), affine, "CT")
    header = SimpleNamespace(SliceThickness="2.5", KVP="120", ConvolutionKernel=["B30f", "3"], PatientName="X^Y")
    inputs = input_features([header], volume)
    assert inputs == {"input.slice_thickness": 2.5, "input.kvp": 120.0, "input.kernel": "B30f\\3",
                      "input.pixel_spacing": 0.7, "input.noise": 0.0}
    mask = np.zeros((4, 8, 8), bool)
    mask[1, 2:4, 2:4] = True
    from inference.prediction import MORPHOLOGICALLY_ABNORMAL_STRUCTURE, SegmentKind

    lesion = Label("Nodule", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                   SegmentKind.LESION)
    pred = Prediction("m", "1", [Segment(lesion, mask, confidence=0.8, tracking_id="Nodule 1"),
                                 Segment(lesion, mask, confidence=0.4, tracking_id="Nodule 2")])
    out = output_features(pred, volume)
    voxel_ml = 2.5 * 0.7 * 0.7 / 1000
    assert out == {"output.findings": 2, "output.positive": "yes", "output.segments": 2,
                   "output.volume_ml.nodule": round(8 * voxel_ml, 3), "output.confidence_max": 0.8,
                   "output.confidence_mean": 0.6}
    assert output_features(Prediction("m", "1"), volume)["output.positive"] == "no"


# -- windows and the whole evaluation ------------------------------------------------------------


def _obs(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=i, at=T0 + i * 3600.0, features={}) for i in range(n)]


def test_windows_by_job_count_never_overlap() -> None:
    s = DriftSettings(baseline_jobs=10, window_jobs=5, min_window_jobs=1)
    baseline, recent, complete = split_windows(_obs(12), s, T0 + DAY)  # type: ignore[arg-type]
    assert [o.id for o in baseline] == list(range(10)) and [o.id for o in recent] == [10, 11] and complete
    baseline, recent, _ = split_windows(_obs(30), s, T0 + DAY)  # type: ignore[arg-type]
    assert [o.id for o in recent] == [25, 26, 27, 28, 29]
    _, _, complete = split_windows(_obs(9), s, T0)  # type: ignore[arg-type]
    assert not complete


def test_windows_by_days_and_by_a_baseline_date_range() -> None:
    start = dt.datetime.fromtimestamp(T0, dt.UTC).date()
    s = DriftSettings(baseline_start=start, baseline_end=start + dt.timedelta(days=1), window_days=0.5)
    obs = _obs(72)  # 3 days, one per hour
    now = T0 + 72 * 3600.0
    baseline, recent, complete = split_windows(obs, s, now)  # type: ignore[arg-type]
    day0 = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC).timestamp()
    assert baseline and all(day0 <= o.at < day0 + DAY for o in baseline) and complete
    assert [o.at for o in recent] == [o.at for o in obs if o.at >= now - 0.5 * DAY]


def _feed(catalog: Catalog, rng: np.random.Generator, *, start: int, n: int, shift: bool,
          scanner: dict[str, str], t0: float = T0) -> None:
    """``n`` jobs of one scanner: kernel, kVp, noise, findings; ``shift`` = a sharper kernel."""
    identity = scanner_identity(scanner)
    for i in range(start, start + n):
        noise = rng.normal(30 if shift else 12, 2)
        features = {
            "input.kernel": "Br64" if shift else "B30f",
            "input.kvp": 120.0,
            "input.noise": round(float(noise), 2),
            "input.slice_thickness": 1.25,
            "output.findings": int(rng.poisson(2.5 if shift else 0.5)),
            "output.positive": "yes" if rng.random() < (0.8 if shift else 0.3) else "no",
        }
        record_observation(catalog, model="ct-lung-nodules", series_instance_uid=f"2.25.{identity.key[:6]}.{i}",
                           job_id=None, at=t0 + i * 600.0, seen_at=t0 + i * 600.0, scanner=identity,
                           features=features, max_scanners=50)


def test_many_jobs_two_scanners_only_the_shifted_one_drifts(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    rng = np.random.default_rng(7)
    settings = DriftSettings(baseline_jobs=300, window_jobs=200, min_window_jobs=50)
    for scanner in (GE, SIEMENS):
        _feed(catalog, rng, start=0, n=300, shift=False, scanner=scanner)
    now = T0 + 300 * 600.0
    report = evaluate(catalog, settings, now)
    assert {p.status for p in report.pairs} == {"collecting"}
    _feed(catalog, rng, start=300, n=200, shift=False, scanner=GE)
    _feed(catalog, rng, start=300, n=200, shift=True, scanner=SIEMENS)
    now = T0 + 500 * 600.0
    monitor = DriftMonitor(catalog, settings)
    report = monitor.report(now)
    by_scanner = {p.scanner: p for p in report.pairs}
    ge, siemens = by_scanner[scanner_identity(GE).label], by_scanner[scanner_identity(SIEMENS).label]
    assert (ge.status, siemens.status) == ("stable", "drift")
    assert (ge.baseline_n, ge.recent_n) == (300, 200)
    psis = {f.feature: f.psi for f in siemens.features}
    assert psis["input.kernel"] > 3 and psis["input.noise"] > 3 and psis["output.findings"] > 0.25
    assert psis["input.kvp"] < 0.01 and psis["input.slice_thickness"] < 0.01
    assert max(f.psi for f in ge.features) < settings.psi_alert
    assert report.alerts == [siemens]
    # The same report from the cache until an observation is added, and for 30 s after that.
    assert monitor.report(now + 1).pairs is report.pairs
    _feed(catalog, rng, start=500, n=1, shift=True, scanner=SIEMENS)
    assert monitor.report(now + 2).pairs is report.pairs
    assert monitor.report(now + 31).pairs is not report.pairs

    registry = CollectorRegistry()
    registry.register(DriftCollector(monitor))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    alerts = {s.labels["scanner"]: s.value for s in families["dicom_node_drift_alert"].samples}
    assert alerts == {ge.scanner: 0.0, siemens.scanner: 1.0}
    kernel_psi = {s.labels["scanner"]: s.value for s in families["dicom_node_drift_psi"].samples
                  if s.labels["feature"] == "input.kernel"}
    assert kernel_psi[ge.scanner] < 0.01 and kernel_psi[siemens.scanner] > 5
    assert {s.labels["scanner"] for s in families["dicom_node_scanner_last_seen_timestamp"].samples} == set(alerts)


def test_a_scanner_that_stops_sending_is_flagged_silent(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    rng = np.random.default_rng(3)
    _feed(catalog, rng, start=0, n=20, shift=False, scanner=GE)
    _feed(catalog, rng, start=0, n=20, shift=False, scanner=SIEMENS, t0=T0 + 7 * DAY)  # 7 days later
    settings = DriftSettings(silent_scanner_days=5)
    now = T0 + 7 * DAY + 20 * 600.0
    silent = {s.label: s.silent for s in evaluate(catalog, settings, now).scanners}
    assert silent == {scanner_identity(GE).label: True, scanner_identity(SIEMENS).label: False}
    assert not any(s.silent for s in evaluate(catalog, DriftSettings(silent_scanner_days=0), now).scanners)


def test_retention_removes_old_observations_but_keeps_the_baseline(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    catalog = Catalog(f"sqlite:///{db}")
    rng = np.random.default_rng(5)
    _feed(catalog, rng, start=0, n=400, shift=False, scanner=GE)  # 600 s apart: 2.8 days
    settings = load_settings(overrides={"database": {"url": f"sqlite:///{db}"},
                                        "storage": {"root": str(tmp_path / "spool")},
                                        "drift": {"baseline_jobs": 100, "retention_days": 1}})
    report = collect_garbage(settings, catalog, now=T0 + 400 * 600.0)
    kept = observations(catalog)
    cutoff = T0 + 400 * 600.0 - DAY
    assert report.drift_observations == len([i for i in range(100, 400) if T0 + i * 600.0 < cutoff])
    assert [o.at for o in kept[:100]] == [T0 + i * 600.0 for i in range(100)]
    assert all(o.at >= cutoff for o in kept[100:])


# -- the web app: /api/drift, /metrics, the panel ------------------------------------------------


def test_api_metrics_and_dashboard_show_drift(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.web import create_app
    from tests.support.queues import MemoryQueue

    db = tmp_path / "c.db"
    catalog = Catalog(f"sqlite:///{db}")
    rng = np.random.default_rng(11)
    for scanner, shift in ((GE, False), (SIEMENS, True)):
        _feed(catalog, rng, start=0, n=40, shift=False, scanner=scanner)
        _feed(catalog, rng, start=40, n=40, shift=shift, scanner=scanner)
    settings = load_settings(overrides={"database": {"url": f"sqlite:///{db}"},
                                        "storage": {"root": str(tmp_path / "spool")},
                                        # Small windows: a chance PSI of 0.3 is common there (docs).
                                        "drift": {"baseline_jobs": 40, "window_jobs": 40, "min_window_jobs": 40,
                                                  "psi_alert": 1.0, "silent_scanner_days": 1}})
    with TestClient(create_app(settings, catalog, MemoryQueue())) as client:
        body = client.get("/api/drift").json()
        assert body["alerts"] == 1 and body["baseline"] == "first 40 jobs"
        first, second = body["pairs"]
        assert (first["scanner"], first["status"], second["status"]) == (scanner_identity(SIEMENS).label, "drift",
                                                                        "stable")
        assert first["worst_feature"] in {"input.kernel", "input.noise"} and first["max_psi"] > 3
        kernel = next(f for f in first["features"] if f["feature"] == "input.kernel")
        assert kernel["bins"] == ["B30f", "Br64"] and kernel["baseline"][0] > 0.9 and kernel["recent"][1] > 0.9
        # Observations are from T0 (2026), older than a day: both scanners are silent now.
        assert body["silent"] == 2 and all(s["silent"] for s in body["scanners"])
        metrics = client.get("/metrics").text
        assert f'dicom_node_drift_alert{{model="ct-lung-nodules",scanner="{first["scanner"]}"}} 1.0' in metrics
        assert f'dicom_node_scanner_silent{{scanner="{second["scanner"]}"}} 1.0' in metrics
        page = client.get("/").text
        assert 'id="drift-table"' in page and "/static/drift.js" in page
        assert client.get("/static/drift.js").status_code == 200



def test_evaluation_reads_the_date_range_baseline_and_the_last_days(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    identity = scanner_identity(GE)
    for i in range(72):  # one job an hour for three days
        record_observation(catalog, model="m", series_instance_uid=f"1.2.{i}", job_id=i, at=T0 + i * 3600.0,
                           seen_at=T0 + i * 3600.0, scanner=identity, features={"input.kvp": 120.0},
                           max_scanners=5)
    start = dt.datetime.fromtimestamp(T0, dt.UTC).date() + dt.timedelta(days=1)
    settings = DriftSettings(baseline_start=start, baseline_end=start + dt.timedelta(days=1), window_days=0.5,
                             min_window_jobs=5)
    (pair,) = evaluate(catalog, settings, T0 + 72 * 3600.0).pairs
    assert (pair.status, pair.baseline_n, pair.recent_n) == ("stable", 24, 12)


def test_recording_is_skipped_when_off_and_never_raises(tmp_path: Path) -> None:
    from dicom_node.drift.record import capture_inputs, record_job

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    volume = Volume(np.zeros((2, 4, 4), np.float32), np.eye(4), "CT")
    header = SimpleNamespace(Manufacturer="GE", StationName="CT01", KVP="120")
    assert capture_inputs(DriftSettings(enabled=False), [header], volume) is None
    inputs = capture_inputs(DriftSettings(), [header], volume)
    assert inputs is not None and inputs["headers"]["StationName"] == "CT01"
    kwargs = {"job_id": 1, "model": "m", "series_instance_uid": "1.2.3", "prediction": Prediction("m", "1"),
              "volume": volume}
    # Broken inputs (a bug elsewhere) are logged, the job goes on.
    assert record_job(catalog, DriftSettings(), inputs={"headers": {}}, **kwargs) is None  # type: ignore[arg-type]
    assert observations(catalog) == []
    label = record_job(catalog, DriftSettings(), inputs=inputs, **kwargs)  # type: ignore[arg-type]
    assert label == scanner_identity({"Manufacturer": "GE", "StationName": "CT01"}).label
    (obs,) = observations(catalog)
    assert obs.features["input.kvp"] == 120.0 and obs.features["output.positive"] == "no"


def test_cli_prints_the_report_and_exits_1_on_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main
    from tests.support.node import write_config

    db = tmp_path / "c.db"
    config = write_config(tmp_path / "n.toml", {
        "database": {"url": f"sqlite:///{db}"}, "storage": {"root": str(tmp_path / "spool")},
        "drift": {"baseline_jobs": 20, "window_jobs": 20, "min_window_jobs": 20, "psi_alert": 1.0,
                  "silent_scanner_days": 0}})
    catalog = Catalog(f"sqlite:///{db}")
    assert main(["drift", "--config", str(config)]) == 0
    assert "no observations yet" in capsys.readouterr().out
    rng = np.random.default_rng(2)
    _feed(catalog, rng, start=0, n=20, shift=False, scanner=SIEMENS)
    _feed(catalog, rng, start=20, n=20, shift=True, scanner=SIEMENS)
    assert main(["drift", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert scanner_identity(SIEMENS).label in out and " drift " in out
    assert main(["drift", "--config", str(config), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["alerts"] == 1
