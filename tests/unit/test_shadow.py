"""Shadow mode: the agreement maths, the saved prediction, shadow jobs in the catalog, the
report, and rule mode changes (promotion) recorded as events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node.catalog import Catalog, JobState
from dicom_node.catalog import shadow as store
from dicom_node.cli import main as cli_main
from dicom_node.cli import parse_since
from dicom_node.results.agreement import (
    StoredPrediction,
    StoredSegment,
    compare,
    dice,
    label_pairs,
    match_findings,
    prediction_archive,
    read_prediction,
)
from dicom_node.scheduling.completion import CompletionLoop
from dicom_node.settings import load_settings
from dicom_node.shadow import build_report, compare_pending, format_report, record_rule_modes
from inference.prediction import ANATOMICAL_STRUCTURE, LUNG, ML, VOLUME, Label, Measurement, Prediction, Segment
from inference.prediction import SegmentKind as Kind
from inference.volume import Volume
from tests.support.queues import MemoryQueue
from tests.unit.test_catalog import inst

SHAPE = (10, 20, 20)


def _geo(n: int = SHAPE[0], ml: float = 0.001) -> np.ndarray:
    """1 mm isotropic slices (voxel 0.001 ml) along z."""
    rows = [[0.0, 0.0, float(k), 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, ml] for k in range(n)]
    return np.array(rows)


def _box(z: slice, y: slice, x: slice) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[z, y, x] = True
    return m


def _seg(name: str, mask: np.ndarray, kind: str = "region", code: str = "", tid: str = "") -> StoredSegment:
    from dicom_node.results.agreement import centroid_mm, mask_volume_ml

    geo = _geo()
    return StoredSegment(name, code, kind, tid or name, mask, None, centroid_mm(mask, geo), mask_volume_ml(mask, geo))


def _pred(*segments: StoredSegment, model: str = "m") -> StoredPrediction:
    return StoredPrediction(model, "1", SHAPE, _geo(), list(segments))


# -- the maths --------------------------------------------------------------------------------


def test_dice_against_numpy_and_the_empty_convention() -> None:
    a = _box(slice(0, 4), slice(0, 10), slice(0, 10))  # 400 voxels
    b = _box(slice(2, 6), slice(0, 10), slice(0, 10))  # 400, 200 shared
    assert dice(a, b) == pytest.approx(2 * 200 / 800)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros(SHAPE, bool)) == 0.0
    empty = np.zeros(SHAPE, bool)
    assert dice(empty, empty) == 1.0  # both found nothing: they agree


def test_labels_pair_by_name_case_insensitively_or_by_code() -> None:
    shadow = [_seg("Bone", _box(slice(0, 1), slice(0, 1), slice(0, 1)), code="SCT:272673000"),
              _seg("Osseous", _box(slice(0, 1), slice(0, 1), slice(0, 1)), code="SCT:1"),
              _seg("spleen", _box(slice(0, 1), slice(0, 1), slice(0, 1)), code="SCT:2")]
    live = [_seg("bone", _box(slice(0, 1), slice(0, 1), slice(0, 1)), code="SCT:9"),
            _seg("Skeleton", _box(slice(0, 1), slice(0, 1), slice(0, 1)), code="SCT:1"),
            _seg("liver", _box(slice(0, 1), slice(0, 1), slice(0, 1)), code="SCT:3")]
    assert label_pairs(shadow, live) == [("Bone", "bone"), ("Osseous", "Skeleton")]


def test_compare_gives_volumes_dice_per_label_and_their_mean() -> None:
    lungs_s = _box(slice(0, 4), slice(0, 10), slice(0, 10))
    lungs_l = _box(slice(2, 6), slice(0, 10), slice(0, 10))
    bone = _box(slice(0, 10), slice(15, 20), slice(15, 20))
    a = compare(_pred(_seg("lungs", lungs_s), _seg("bone", bone)), _pred(_seg("Lungs", lungs_l), _seg("bone", bone)))
    assert a.basis == "labels"
    assert a.detail["dice_per_label"] == {"lungs / Lungs": 0.5, "bone": 1.0}
    assert a.dice == pytest.approx(0.75)
    assert a.detail["volumes_ml"]["shadow"] == {"lungs": 0.4, "bone": 0.25}
    assert a.detail["volumes_ml"]["live"] == {"Lungs": 0.4, "bone": 0.25}


def test_no_label_in_common_compares_the_overall_foreground() -> None:
    body = _box(slice(0, 10), slice(0, 20), slice(0, 10))  # 2000
    tissue = _box(slice(0, 10), slice(0, 20), slice(5, 15))  # 2000, 1000 shared
    a = compare(_pred(_seg("body", body, code="SCT:a")), _pred(_seg("tissue", tissue, code="SCT:b")))
    assert a.basis == "foreground"
    assert a.dice == pytest.approx(0.5)


def test_findings_match_by_centre_distance_or_overlap_one_to_one() -> None:
    s1 = _seg("nodule", _box(slice(1, 3), slice(1, 3), slice(1, 3)), "lesion", tid="S1")  # centre (1.5,1.5,1.5)
    s2 = _seg("nodule", _box(slice(7, 9), slice(15, 17), slice(15, 17)), "lesion", tid="S2")
    l1 = _seg("nodule", _box(slice(2, 4), slice(2, 4), slice(2, 4)), "lesion", tid="L1")  # 1.73 mm from S1
    l2 = _seg("nodule", _box(slice(7, 9), slice(2, 4), slice(17, 19)), "lesion", tid="L2")  # far from both
    matched = match_findings([s1, s2], [l1, l2], radius_mm=5.0)
    assert [(m["shadow"], m["live"]) for m in matched] == [("S1", "L1")]
    assert matched[0]["distance_mm"] == pytest.approx(np.sqrt(3), abs=0.01) and matched[0]["overlap"]
    # Within 20 mm, S2 and L2 match too (13 mm apart); S1 keeps L1, its nearest.
    assert len(match_findings([s1, s2], [l1, l2], radius_mm=20.0)) == 2
    a = compare(_pred(s1, s2), _pred(l1, l2), radius_mm=5.0)
    assert (a.shadow_findings, a.live_findings, a.matched_findings) == (2, 2, 1)


def test_prediction_archive_round_trips_masks_labels_and_geometry() -> None:
    affine = np.diag([2.5, 0.8, 0.8, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 7.0)
    volume = Volume(np.zeros(SHAPE, np.float32), affine, "CT")
    lungs = _box(slice(1, 5), slice(2, 9), slice(3, 12))
    nodule = _box(slice(6, 8), slice(10, 13), slice(10, 13))
    pred = Prediction("m", "2.0", [
        Segment(Label("lungs", ANATOMICAL_STRUCTURE, LUNG), lungs, [Measurement(VOLUME, 1.234, ML)]),
        Segment(Label("nodule", ANATOMICAL_STRUCTURE, LUNG, Kind.LESION), nodule, tracking_id="Nodule 1",
                confidence=0.9),
    ])
    stored = read_prediction(_write(pred, volume))
    assert stored.shape == SHAPE and stored.version == "2.0"
    assert [s.name for s in stored.segments] == ["lungs", "nodule"]
    assert np.array_equal(stored.segments[0].mask, lungs) and np.array_equal(stored.segments[1].mask, nodule)
    assert stored.segments[0].volume_ml == 1.234  # the model's own measurement
    # No measurement: counted with the geometry's voxel volume (2.5 * 0.8 * 0.8 mm3).
    assert stored.segments[1].volume_ml == pytest.approx(nodule.sum() * 1.6 / 1000)
    idx = np.argwhere(nodule).mean(axis=0)
    assert stored.segments[1].centre == pytest.approx(tuple(affine[:3, :3] @ idx + affine[:3, 3]))
    assert [s.tracking_id for s in stored.findings] == ["Nodule 1"]
    assert compare(stored, stored).dice == 1.0


def _write(pred: Prediction, volume: Volume, path: Path | None = None) -> Path:
    import tempfile

    path = path or Path(tempfile.mkdtemp()) / "prediction.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prediction_archive(pred, volume))
    return path


# -- catalog, worker side, report -------------------------------------------------------------


CONFIG = """
[storage]
root = "{root}/spool"
[database]
url = "sqlite:///{root}/c.db"
[completion]
idle_seconds = 5
incomplete_grace_seconds = 0
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 4242
[[rules]]
name = "ct"
match = {{ Modality = "CT" }}
models = ["ct-tissue"]
destinations = ["archive"]
[[rules]]
name = "ct-trial"
match = {{ Modality = "CT" }}
models = ["foreground", "ct-tissue"]
destinations = ["archive"]
mode = "{mode}"
"""


def _settings(tmp_path: Path, mode: str = "shadow"):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "n.toml"
    cfg.write_text(CONFIG.format(root=tmp_path, mode=mode))
    return load_settings(cfg), cfg


def test_shadow_rule_makes_shadow_jobs_without_destinations(tmp_path: Path) -> None:
    """The shadow rule's model gets a shadow job with no destination and no delivery row; a model
    both rules name runs once, live (its results must reach the live rule's archive)."""
    settings, _ = _settings(tmp_path)
    catalog = Catalog(settings.database.url)
    catalog.record_instances([inst(1, 100.0)])
    CompletionLoop(settings, catalog, MemoryQueue()).tick(now=106.0)
    jobs = {j.model: j for j in catalog.list_jobs()}
    assert {m: (j.mode, j.destinations, j.rule) for m, j in jobs.items()} == {
        "ct-tissue": ("live", ["archive"], "ct"), "foreground": ("shadow", [], "ct-trial")}
    assert catalog.deliveries(jobs["foreground"].id) == []
    assert "shadow" in (catalog.job_events(jobs["foreground"].id)[0].detail or "")
    assert store.has_shadow_sibling(catalog, jobs["ct-tissue"])
    assert store.has_shadow_sibling(catalog, jobs["foreground"])
    # encoded -> done directly, and the label never reads like a delivered job.
    fg = jobs["foreground"].id
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.DONE):
        catalog.transition(fg, state)
    done = catalog.get_job(fg)
    assert done is not None and done.state_label == "done (shadow)" and done.delivering_at is None
    assert jobs["ct-tissue"].state_label == "queued"


def _finish(catalog: Catalog, job_id: int, outbox: Path, pred: Prediction, volume: Volume) -> None:
    path = _write(pred, volume, outbox / f"job-{job_id}" / "prediction.npz")
    catalog.set_results(job_id, {"prediction": str(path)})
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.DONE):
        catalog.transition(job_id, state)


def test_pairs_are_compared_once_when_both_are_done_and_reported(tmp_path: Path) -> None:
    settings, cfg = _settings(tmp_path)
    catalog = Catalog(settings.database.url)
    catalog.record_instances([inst(1, 100.0)])
    CompletionLoop(settings, catalog, MemoryQueue()).tick(now=106.0)
    jobs = {j.model: j for j in catalog.list_jobs()}
    volume = Volume(np.zeros(SHAPE, np.float32), np.eye(4), "CT")
    lab = Label("body", ANATOMICAL_STRUCTURE, LUNG)
    live_mask = _box(slice(0, 4), slice(0, 10), slice(0, 10))
    shadow_mask = _box(slice(2, 6), slice(0, 10), slice(0, 10))
    _finish(catalog, jobs["foreground"].id, settings.outbox, Prediction("foreground", "1", [Segment(lab, shadow_mask)]),
            volume)
    assert store.pairs_to_compare(catalog) == []  # the live job is not done yet
    _finish(catalog, jobs["ct-tissue"].id, settings.outbox, Prediction("ct-tissue", "1", [Segment(lab, live_mask)]),
            volume)
    assert compare_pending(catalog, settings.outbox) == 1
    assert compare_pending(catalog, settings.outbox) == 0  # stored once
    report = build_report(catalog)
    (pair,) = report["pairs"]
    assert (pair["shadow_model"], pair["live_model"], pair["series"]) == ("foreground", "ct-tissue", 1)
    assert pair["mean_dice"] == pytest.approx(0.5)
    assert pair["finding_agreement"] == 1.0  # neither found a lesion
    assert pair["mean_volumes_ml"] == {"shadow": {"body": 0.4}, "live": {"body": 0.4}}
    text = format_report(report)
    assert "shadow foreground  vs  live ct-tissue" in text and "mean Dice 0.500" in text
    assert build_report(catalog, model="nothing")["pairs"] == []
    assert build_report(catalog, since=1e12)["pairs"] == []
    # The CLI prints the same figures, as text and as JSON.
    assert cli_main(["shadow", "report", "--config", str(cfg), "--format", "json"]) == 0


def test_shadow_report_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings, cfg = _settings(tmp_path)
    Catalog(settings.database.url)
    assert cli_main(["shadow", "report", "--config", str(cfg)]) == 0
    assert "no shadow comparison yet" in capsys.readouterr().out
    assert cli_main(["shadow", "report", "--config", str(cfg), "--format", "json", "--since", "7d"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == []


def test_since_accepts_durations_and_dates() -> None:
    assert parse_since("24h", now=100000.0) == 100000.0 - 86400
    assert parse_since("90m", now=10000.0) == 10000.0 - 5400
    assert parse_since("2026-12-01") == 1796083200.0
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday")


def test_a_promotion_is_recorded_as_an_event_once(tmp_path: Path) -> None:
    settings, _ = _settings(tmp_path, mode="shadow")
    catalog = Catalog(settings.database.url)
    assert record_rule_modes(catalog, settings.rules) == []  # first start: recorded quietly
    assert record_rule_modes(catalog, settings.rules) == []  # unchanged
    promoted, _ = _settings(tmp_path, mode="live")
    assert record_rule_modes(catalog, promoted.rules) == [
        "rule ct-trial (foreground,ct-tissue) promoted to live (was shadow)"]
    assert record_rule_modes(catalog, promoted.rules) == []
    events = build_report(catalog)["events"]
    assert [(e["rule"], e["old_mode"], e["new_mode"]) for e in events] == [("ct-trial", "shadow", "live")]


def test_api_and_dashboard_show_shadow_jobs_and_the_comparison(tmp_path: Path) -> None:
    """/api/jobs labels the shadow job ``done (shadow)`` with no end-to-end time (nothing was
    delivered), /api/shadow gives the pair's figures and the dashboard has the shadow panel."""
    from fastapi.testclient import TestClient

    from dicom_node.web import create_app

    settings, _ = _settings(tmp_path)
    catalog = Catalog(settings.database.url)
    catalog.record_instances([inst(1, 100.0)])
    CompletionLoop(settings, catalog, MemoryQueue()).tick(now=106.0)
    jobs = {j.model: j for j in catalog.list_jobs()}
    volume = Volume(np.zeros(SHAPE, np.float32), np.eye(4), "CT")
    lab = Label("body", ANATOMICAL_STRUCTURE, LUNG)
    mask = _box(slice(0, 4), slice(0, 10), slice(0, 10))
    for model in ("foreground", "ct-tissue"):
        _finish(catalog, jobs[model].id, settings.outbox, Prediction(model, "1", [Segment(lab, mask)]), volume)
    compare_pending(catalog, settings.outbox)
    with TestClient(create_app(settings, catalog, MemoryQueue())) as client:
        listed = {j["model"]: j for j in client.get("/api/jobs").json()}
        assert listed["foreground"]["mode"] == "shadow" and listed["foreground"]["state_label"] == "done (shadow)"
        assert listed["foreground"]["end_to_end_s"] is None
        assert listed["ct-tissue"]["mode"] == "live" and listed["ct-tissue"]["state_label"] == "done"
        body = client.get("/api/shadow").json()
        (pair,) = body["pairs"]
        assert (pair["shadow_model"], pair["live_model"], pair["mean_dice"]) == ("foreground", "ct-tissue", 1.0)
        assert pair["series_list"][0]["series_instance_uid"] == jobs["foreground"].series_instance_uid
        assert client.get("/api/shadow", params={"model": "other"}).json()["pairs"] == []
        page = client.get("/").text
        assert 'id="shadow-panel"' in page and "shadow.js" in page
        assert "state-shadow" in client.get("/static/app.js").text


def test_config_check_counts_shadow_rules_and_warns_of_ignored_destinations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = _settings(tmp_path)
    assert cli_main(["config", "check", "--config", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "2 rule(s) (1 shadow)" in out.out
    assert "rule 'ct-trial' is mode = \"shadow\": its destinations ['archive'] are ignored" in out.err
