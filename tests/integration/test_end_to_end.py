"""The whole path with real processes: storescu → dicom-node → Celery worker → SEG + SR → storescp.

Each test starts a real ``dicom-node serve`` (and, for Redis, a real ``redis-server`` and a
separate ``dicom-node worker``), sends a synthetic CT phantom with DCMTK ``storescu`` and checks
what arrives in a DCMTK ``storescp`` archive against the phantom's known volumes.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import NodeProcess, node_config, start_node, wait_until

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
RULES = [
    {"name": "all-ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": ["archive"]},
    {"name": "mr-misrouted", "match": {"Modality": "MR"}, "models": ["ct-tissue"], "destinations": ["archive"]},
]


def storescu(port: int, files: list[Path], calling: str = "CT1") -> None:
    require_tool("storescu")
    res = procs.run_tool(
        ["storescu", "-aet", calling, "-aec", "DICOM_NODE", procs.LOOPBACK, str(port), *map(str, files)], timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr


def archived(archive: procs.Server) -> dict[str, list[pydicom.Dataset]]:
    """What the archive holds, by SOP class."""
    out: dict[str, list[pydicom.Dataset]] = {}
    for path in Path(archive.extra["received"]).iterdir():
        if path.suffix == "" or path.is_file():
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # noqa: S112 - storescp may be writing the file right now
                continue
            ds.filename = str(path)
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def wait_for_results(
    archive: procs.Server, node: NodeProcess, n_seg: int, n_sr: int, timeout: float = 120
) -> dict[str, list[pydicom.Dataset]]:
    def ready() -> dict[str, list[pydicom.Dataset]] | None:
        got = archived(archive)
        if len(got.get(SEG_CLASS, [])) >= n_seg and len(got.get(SR_CLASS, [])) >= n_sr:
            return got
        return None

    try:
        return wait_until(ready, timeout, what="SEG + SR in the archive")  # type: ignore[no-any-return]
    except TimeoutError:
        pytest.fail(f"results did not arrive; node logs:\n{node.logs()[-8000:]}")


def check_results(
    got: dict[str, list[pydicom.Dataset]], phantom_series: str, phantom: object, dciodvfy_clean: object
) -> None:
    seg = next(ds for ds in got[SEG_CLASS] if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom_series)
    sr = next(
        ds
        for ds in got[SR_CLASS]
        if any(
            ev.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom_series
            for ev in ds.CurrentRequestedProcedureEvidenceSequence
        )
    )
    for ds in (seg, sr):
        dciodvfy_clean(ds.filename)  # type: ignore[operator]
    dump = procs.run_tool(["dsrdump", sr.filename])
    assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout, dump.stdout + dump.stderr
    assert dump.stderr.strip() == ""

    segmentation = hd.seg.segread(seg.filename)
    spacing = np.linalg.norm(phantom.affine[:3, :3], axis=0)  # type: ignore[attr-defined]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {}
    for number in segmentation.segment_numbers:
        desc = segmentation.get_segment_description(number)
        volumes[desc.segment_label.lower()] = _segment_volume(segmentation, number, voxel_ml)
    truth = phantom.volumes_ml  # type: ignore[attr-defined]
    lungs = next(v for k, v in volumes.items() if "lung" in k)
    body = next(v for k, v in volumes.items() if "body" in k)
    assert lungs == pytest.approx(truth["lungs"], rel=0.03)
    assert body == pytest.approx(truth["body"], rel=0.03)


def _segment_volume(segmentation: hd.seg.Segmentation, number: int, voxel_ml: float) -> float:
    """Voxels of one segment over all frames, in ml."""
    pixels = segmentation.pixel_array
    if pixels.ndim == 3:  # one segment: (frames, rows, cols)
        pixels = pixels[..., None]
    frames = [
        i
        for i, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence)
        if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number
    ]
    return float(pixels[frames].astype(bool).sum()) * voxel_ml


def check_metrics(web_port: int, *, done_jobs: int, instances: int) -> None:
    """/metrics, parsed with prometheus_client: stage histograms have counts, the end-to-end
    histogram one observation per delivered job, and the ingest counters what storescu sent."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    stage_counts = {
        dict(labels)["stage"]: v for (name, labels), v in samples.items() if name == "dicom_node_stage_seconds_count"
    }
    assert stage_counts and all(v == done_jobs for v in stage_counts.values()), stage_counts
    assert sum(v for (name, _), v in samples.items() if name == "dicom_node_end_to_end_seconds_count") == done_jobs
    assert samples[("dicom_node_instances_received_total", (("calling_ae", "CT1"),))] == instances
    assert samples[("dicom_node_store_status_total", (("status", "0x0000"),))] == instances


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[procs.Server]:
    require_tool("storescp")
    server = procs.start_storescp(tmp_path / "archive")
    yield server
    server.stop()


def destination(archive: procs.Server) -> dict[str, object]:
    return {"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}


@pytest.mark.slow
def test_embedded_broker_end_to_end(tmp_path: Path, archive: procs.Server, dciodvfy_clean: object) -> None:
    """With the default embedded broker and in-process worker, a CT phantom comes back as a
    valid SEG + SR whose lung and body volumes match the phantom within 3 %; an MR series
    routed to the CT model and a one-slice CT end as failed jobs with readable reasons."""
    phantom = make_chest_phantom(ChestSpec())
    info = SeriesInfo(seed="e2e-embedded")
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "ct")
    mr_files = write_datasets(
        slice_datasets(phantom.hu[:5], phantom.affine, SeriesInfo(seed="e2e-mr", modality="MR")), tmp_path / "mr"
    )
    one_files = write_datasets(
        slice_datasets(phantom.hu[:1], phantom.affine, SeriesInfo(seed="e2e-one")), tmp_path / "one"
    )

    web_port = procs.free_port()
    node = start_node(
        tmp_path / "node",
        node_config(
            tmp_path / "node",
            destinations=[destination(archive)],
            rules=RULES,
            web={"enabled": True, "host": procs.LOOPBACK, "port": web_port},
        ),
    )
    try:
        storescu(node.port, files)
        storescu(node.port, mr_files)
        storescu(node.port, one_files)
        got = wait_for_results(archive, node, 1, 1)
        check_results(got, info.uid("series"), phantom, dciodvfy_clean)

        catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}")

        def settled() -> list[object] | None:
            jobs = catalog.list_jobs()
            return jobs if len(jobs) == 3 and all(j.state in ("done", "failed") for j in jobs) else None

        jobs = {j.series_instance_uid: j for j in wait_until(settled, 90, what="all jobs settled")}
        ok = jobs[info.uid("series")]
        assert ok.state == "done", ok.reason
        assert ok.done_at and ok.queued_at and ok.running_at and ok.encoded_at and ok.delivering_at
        mr = jobs[SeriesInfo(seed="e2e-mr").uid("series")]
        assert mr.state == "failed" and "CT" in (mr.reason or "") and "MR" in (mr.reason or "")
        one = jobs[SeriesInfo(seed="e2e-one").uid("series")]
        assert one.state == "failed" and "slice" in (one.reason or "")
        check_metrics(web_port, done_jobs=1, instances=len(files) + len(mr_files) + len(one_files))
    finally:
        node.stop()


@pytest.mark.slow
def test_redis_broker_with_separate_worker(
    tmp_path: Path, archive: procs.Server, redis_server: procs.Server, dciodvfy_clean: object
) -> None:
    """With a real redis-server broker and a separate `dicom-node worker`, the same phantom
    round-trips to the archive with the right volumes."""
    phantom = make_chest_phantom(ChestSpec(seed=3))
    info = SeriesInfo(seed="e2e-redis")
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "ct")
    config = node_config(
        tmp_path / "node",
        broker_url=redis_server.extra["url"],
        destinations=[destination(archive)],
        rules=RULES[:1],
        worker={"in_process": "no"},
    )
    node = start_node(tmp_path / "node", config)
    try:
        node.start_worker("gpu1")
        storescu(node.port, files)
        got = wait_for_results(archive, node, 1, 1)
        check_results(got, info.uid("series"), phantom, dciodvfy_clean)
        assert "gpu1@" in node.logs()
    finally:
        node.stop()


@pytest.mark.slow
def test_unreachable_archive_fails_the_job_with_reason(tmp_path: Path) -> None:
    """When the destination refuses connections, the job ends failed and says which archive."""
    phantom = make_chest_phantom(ChestSpec(slices=12))
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="e2e-down")), tmp_path / "ct")
    dead = {"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": procs.free_port()}
    node = start_node(tmp_path / "node", node_config(tmp_path / "node", destinations=[dead], rules=RULES[:1]))
    try:
        storescu(node.port, files)
        catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}")
        jobs = wait_until(
            lambda: [j for j in catalog.list_jobs() if j.state in ("done", "failed")], 120, what="job settled"
        )
        assert jobs[0].state == "failed"
        assert "ARCHIVE" in (jobs[0].reason or "") and str(dead["port"]) in (jobs[0].reason or "")
    finally:
        node.stop()


@pytest.mark.slow
def test_lung_nodules_end_to_end_with_redis(
    tmp_path: Path, archive: procs.Server, redis_server: procs.Server, dciodvfy_clean: object
) -> None:
    """ct-lung-nodules through a real Redis broker and a separate worker: the SEG + SR of a chest
    with a free-floating and a wall-attached nodule reach the archive, dciodvfy-clean, and every
    SR centre point (SCOORD3D POINT) lies within 2 mm of a true nodule centre."""
    from tests.integration.test_model_results import sr_centre_points
    from tests.support.chest_nodules import chest_spec, make_nodule_phantom

    nod = make_nodule_phantom(chest_spec(seed=11), (9.0, 16.0), ("free", "lateral"), vessels=4, seed=11)
    info = SeriesInfo(seed="e2e-nodules")
    files = write_datasets(slice_datasets(nod.phantom.hu, nod.phantom.affine, info), tmp_path / "ct")
    rules = [
        {
            "name": "chest",
            "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
            "models": ["ct-lung-nodules"],
            "destinations": ["archive"],
            "priority": "urgent",
        }
    ]
    config = node_config(
        tmp_path / "node",
        broker_url=redis_server.extra["url"],
        destinations=[destination(archive)],
        rules=rules,
        worker={"in_process": "no"},
    )
    node = start_node(tmp_path / "node", config)
    try:
        node.start_worker("gpu1")
        storescu(node.port, files)
        got = wait_for_results(archive, node, 1, 1)
        seg, sr = got[SEG_CLASS][0], got[SR_CLASS][0]
        dciodvfy_clean(seg.filename)  # type: ignore[operator]
        dciodvfy_clean(sr.filename)  # type: ignore[operator]
        assert len(seg.SegmentSequence) == 2
        centres = sr_centre_points(hd.sr.srread(sr.filename))
        truth = [np.array(s.centre) for s in nod.phantom.nodules]
        assert len(centres) == 2
        for c in centres:
            assert min(float(np.linalg.norm(np.array(c) - t)) for t in truth) <= 2.0
    finally:
        node.stop()
