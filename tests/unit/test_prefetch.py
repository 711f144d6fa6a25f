"""Prefetch of the next job's series (``workers.prefetch``): used when exact, dropped otherwise.

Real parts throughout: a SQLite catalog in ``tmp_path``, chest phantoms spooled as DICOM files
and recorded the way the listener records them, the real loader and the ``ct-tissue`` model.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from structlog.testing import capture_logs

from dicom_node.catalog import Catalog, JobRow, JobSpec, JobState
from dicom_node.catalog.recorder import instance_from_file
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.imaging.loading import LoadedSeries, SeriesError, load_series
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import DatabaseSettings, Settings, StorageSettings, WorkerSettings
from inference.registry import ModelRegistry
from tests.support.queues import MemoryQueue
from workers.pipeline import WorkerContext, build_context, deliver, load_job_series, run_inference
from workers.prefetch import Prefetcher, SeriesFiles, next_queued_job

SLICES = 16
MODEL = "ct-tissue"


@cache
def _hu() -> tuple[np.ndarray, np.ndarray]:
    phantom = make_chest_phantom(ChestSpec(slices=SLICES + 1))
    return phantom.hu, phantom.affine


@dataclass
class Spooled:
    job_id: int
    series_instance_uid: str
    folder: Path
    paths: list[Path]
    #: The last slice, written and recorded only when a test sends it late.
    late: pydicom.Dataset


class Node:
    """A catalog and a spool, with series received, completed and queued as the node does it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
        self.queue = MemoryQueue()

    def receive(self, seed: str, *, model: str = MODEL, priority: str = "normal") -> Spooled:
        hu, affine = _hu()
        info = SeriesInfo(seed=seed)
        datasets = slice_datasets(hu, affine, info)
        folder = self.root / "spool" / info.uid("study") / info.uid("series")
        paths = write_datasets(datasets[:SLICES], folder)
        self.record(paths)
        uid = info.uid("series")
        self.catalog.mark_series_complete(uid, "idle")
        (job_id,) = self.catalog.create_jobs([JobSpec(uid, "test", model, [], priority)])
        queue_job(self.catalog, self.queue, job_id)
        return Spooled(job_id, uid, folder, paths, datasets[SLICES])

    def record(self, paths: Sequence[Path]) -> None:
        self.catalog.record_instances([instance_from_file(p, calling_ae_title="CT1") for p in paths])

    def run(self, job_id: int) -> JobRow:
        """The job as a worker holds it once its task started."""
        return self.catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,), count_attempt=True)

    def job(self, job_id: int) -> JobRow:
        job = self.catalog.get_job(job_id)
        assert job is not None
        return job


class CountingLoader:
    """``load_series``, recording every call and how many loaded volumes were alive at its start."""

    def __init__(self) -> None:
        self.calls: list[list[Path]] = []
        self.alive_at_start: list[int] = []
        self._alive: set[int] = set()
        self._lock = threading.Lock()

    def alive(self) -> int:
        gc.collect()
        with self._lock:
            return len(self._alive)

    def __call__(self, paths: Sequence[Path]) -> LoadedSeries:
        self.alive_at_start.append(self.alive())
        self.calls.append(list(paths))
        loaded = load_series(paths)
        key = id(loaded.volume.array)
        with self._lock:
            self._alive.add(key)
        weakref.finalize(loaded.volume.array, self._forget, key)
        return loaded

    def _forget(self, key: int) -> None:
        with self._lock:
            self._alive.discard(key)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.catalog.close()


@pytest.fixture
def loader() -> CountingLoader:
    return CountingLoader()


@pytest.fixture
def prefetcher(node: Node, loader: CountingLoader) -> Iterator[Prefetcher]:
    p = Prefetcher(node.catalog, [MODEL], load=loader)
    yield p
    p.close()


def context(node: Node, prefetcher: Prefetcher | None) -> WorkerContext:
    settings = Settings(storage=StorageSettings(root=node.root / "spool"),
                        database=DatabaseSettings(url=node.catalog.url))
    return WorkerContext(settings, node.catalog, ModelRegistry(torch.device("cpu")), prefetcher=prefetcher)


def test_next_queued_job_is_urgent_first_then_oldest_of_the_workers_models(node: Node) -> None:
    """The guess follows the broker's order: urgent first, then oldest; other models and the running job are skipped."""
    old = node.receive("a")
    newer = node.receive("b")
    other_model = node.receive("c", model="someone-elses-model", priority="urgent")
    urgent = node.receive("d", priority="urgent")
    assert next_queued_job(node.catalog, [MODEL]).id == urgent.job_id  # type: ignore[union-attr]
    node.run(urgent.job_id)
    assert next_queued_job(node.catalog, [MODEL]).id == old.job_id  # type: ignore[union-attr]
    assert next_queued_job(node.catalog, [MODEL], exclude={old.job_id}).id == newer.job_id  # type: ignore[union-attr]
    assert next_queued_job(node.catalog, ["someone-elses-model"]).id == other_model.job_id  # type: ignore[union-attr]
    assert next_queued_job(node.catalog, ["no-such-model"]) is None


def test_next_queued_job_is_the_oldest_of_more_than_a_thousand(node: Node) -> None:
    """With 1,200 jobs queued the guess is still the oldest one, the job the broker hands out next
    (reading only the newest 1,000 would pick the 201st)."""
    first = node.receive("many-0")
    uid = first.series_instance_uid
    catalog = node.catalog
    ids = catalog.create_jobs([JobSpec(uid, "test", f"{MODEL}-{n}", [], "normal") for n in range(1, 1200)])
    for job_id in ids:
        queue_job(catalog, node.queue, job_id)
    models = [MODEL] + [f"{MODEL}-{n}" for n in range(1, 1200)]
    assert len(catalog.list_jobs(state=JobState.QUEUED.value, limit=5000)) == 1200
    assert next_queued_job(catalog, models).id == first.job_id  # type: ignore[union-attr]
    assert next_queued_job(catalog, models, exclude={first.job_id}).id == ids[0]  # type: ignore[union-attr]


def test_prefetched_volume_is_used_when_the_files_are_unchanged(
    node: Node, prefetcher: Prefetcher, loader: CountingLoader
) -> None:
    """While job A runs, B's series is loaded once in the background and B's task takes it as loaded."""
    a, b = node.receive("a"), node.receive("b")
    job_a = node.run(a.job_id)
    ctx = context(node, prefetcher)
    _, timings_a = load_job_series(ctx, job_a)
    assert timings_a["prefetched"] is False
    prefetcher.start(a.job_id)
    assert prefetcher.wait_idle(60)
    assert prefetcher.held_job_id() == b.job_id
    loaded, timings_b = load_job_series(ctx, node.run(b.job_id))
    assert timings_b["prefetched"] is True
    assert [sorted(c) for c in loader.calls] == [sorted(b.paths)]
    assert prefetcher.held_job_id() is None  # handed over, not kept
    expected = load_series(b.paths)
    np.testing.assert_array_equal(loaded.volume.array, expected.volume.array)
    np.testing.assert_array_equal(loaded.volume.affine, expected.volume.affine)
    assert [ds.SOPInstanceUID for ds in loaded.sources] == [ds.SOPInstanceUID for ds in expected.sources]


def test_prefetch_runs_during_the_job_and_gives_the_same_results(node: Node, prefetcher: Prefetcher) -> None:
    """run_inference prefetches the next job's series; that job's SEG and SR equal those without prefetch."""
    a, b = node.receive("a"), node.receive("b")
    ctx = context(node, prefetcher)
    results_a = run_inference(ctx, node.run(a.job_id))
    assert results_a["timings"]["prefetched"] is False
    assert set(ctx.timings) == {"load_wait", "load", "predict", "encode"}
    assert prefetcher.wait_idle(60)
    job_b = node.run(b.job_id)
    with_prefetch = run_inference(ctx, job_b)
    assert with_prefetch["timings"]["prefetched"] is True
    assert with_prefetch["timings"]["prefetch_load_s"] >= 0
    saved = {Path(f).name: pydicom.dcmread(f) for f in with_prefetch["files"]}
    without = run_inference(context(node, None), job_b)
    assert without["timings"]["prefetched"] is False
    assert [Path(f).name for f in without["files"]] == list(saved)
    for f in without["files"]:
        again, before = pydicom.dcmread(f), saved[Path(f).name]
        assert again.SOPInstanceUID == before.SOPInstanceUID
        if again.Modality == "SEG":
            assert again.PixelData == before.PixelData and len(again.SegmentSequence) == 4
        else:
            assert again.ContentSequence == before.ContentSequence
    node.catalog.set_results(b.job_id, without)
    assert deliver(ctx, node.job(b.job_id)) == []  # no destinations: nothing to send
    assert "deliver" in ctx.timings


@pytest.mark.parametrize("change", ["late instance", "re-sent instance"])
def test_prefetched_volume_is_discarded_when_the_instances_changed(
    node: Node, prefetcher: Prefetcher, loader: CountingLoader, change: str
) -> None:
    """A volume prefetched before a late or re-sent instance arrived is dropped: the job loads the files as they are."""
    a, b = node.receive("a"), node.receive("b")
    node.run(a.job_id)
    prefetcher.start(a.job_id)
    assert prefetcher.wait_idle(60) and prefetcher.held_job_id() == b.job_id
    if change == "late instance":
        node.record(write_datasets([b.late], b.folder))
        expected_slices = SLICES + 1
    else:
        ds = pydicom.dcmread(b.paths[3])
        pixels = ds.pixel_array.copy()
        pixels[40:60, 40:60] = 2000
        ds.PixelData = pixels.tobytes()
        ds.ImageComments = "re-sent with corrected pixels"
        ds.save_as(b.paths[3], enforce_file_format=True)
        node.record([b.paths[3]])
        expected_slices = SLICES
    job_b = node.run(b.job_id)
    with capture_logs() as logs:
        loaded, timings = load_job_series(context(node, prefetcher), job_b)
    assert timings["prefetched"] is False
    assert [e["reason"] for e in logs if e["event"] == "prefetch_unused"] == ["instances changed since the prefetch"]
    assert prefetcher.held_job_id() is None
    assert loaded.volume.shape[0] == expected_slices
    paths = node.catalog.series_paths(b.series_instance_uid)
    np.testing.assert_array_equal(loaded.volume.array, load_series(paths).volume.array)


def test_failed_prefetch_falls_back_to_the_normal_load(node: Node, prefetcher: Prefetcher) -> None:
    """A file unreadable while it was prefetched does not fail the job: its own load reads it."""
    a, b = node.receive("a"), node.receive("b")
    node.run(a.job_id)
    moved = b.paths[5].with_suffix(".away")
    b.paths[5].rename(moved)
    prefetcher.start(a.job_id)
    assert prefetcher.wait_idle(60)
    moved.rename(b.paths[5])
    job_b = node.run(b.job_id)
    with capture_logs() as logs:
        loaded, timings = load_job_series(context(node, prefetcher), job_b)
    assert timings["prefetched"] is False
    (unused,) = [e for e in logs if e["event"] == "prefetch_unused"]
    assert unused["reason"].startswith("prefetch failed: SeriesError")
    assert loaded.volume.shape[0] == SLICES
    np.testing.assert_array_equal(loaded.volume.array, load_series(b.paths).volume.array)


def test_broken_series_reports_the_loaders_own_error(node: Node, prefetcher: Prefetcher) -> None:
    """When the series itself is broken, the job fails with the loader's error, not a prefetch error."""
    a, b = node.receive("a"), node.receive("b")
    node.run(a.job_id)
    b.paths[5].write_bytes(b.paths[5].read_bytes()[:700])  # truncated inside the header
    with pytest.raises(SeriesError) as direct:
        load_series(b.paths)
    prefetcher.start(a.job_id)
    assert prefetcher.wait_idle(60) and prefetcher.held_job_id() == b.job_id
    job_b = node.run(b.job_id)
    with capture_logs() as logs, pytest.raises(SeriesError) as via_job:
        load_job_series(context(node, prefetcher), job_b)
    assert str(via_job.value) == str(direct.value)
    (unused,) = [e for e in logs if e["event"] == "prefetch_unused"]
    assert unused["reason"] == f"prefetch failed: SeriesError: {direct.value}"


def test_prefetcher_holds_one_volume_at_most(node: Node, prefetcher: Prefetcher, loader: CountingLoader) -> None:
    """A new guess drops the held volume before loading the next one: never two in the prefetcher."""
    a, b = node.receive("a"), node.receive("b")
    node.run(a.job_id)
    prefetcher.start(a.job_id)
    assert prefetcher.wait_idle(60) and prefetcher.held_job_id() == b.job_id
    urgent = node.receive("u", priority="urgent")  # now ahead of B
    prefetcher.start(a.job_id)
    assert prefetcher.wait_idle(60) and prefetcher.held_job_id() == urgent.job_id
    prefetcher.start(a.job_id)  # the same guess again: kept, not loaded twice
    assert prefetcher.wait_idle(60) and prefetcher.held_job_id() == urgent.job_id
    assert [sorted(c) for c in loader.calls] == [sorted(b.paths), sorted(urgent.paths)]
    assert loader.alive_at_start == [0, 0]
    assert loader.alive() == 1
    prefetcher.close()
    assert loader.alive() == 0


def test_series_files_change_with_size_and_mtime(tmp_path: Path) -> None:
    """The key of a prefetched volume changes when a file is rewritten or removed."""
    path = tmp_path / "x.dcm"
    path.write_bytes(b"a" * 10)
    before = SeriesFiles.of([path])
    assert SeriesFiles.of([path]) == before
    path.write_bytes(b"a" * 11)
    assert SeriesFiles.of([path]) != before
    path.unlink()
    assert SeriesFiles.of([path]).files == ((str(path), -1, -1),)


@pytest.mark.parametrize(("setting", "enabled"), [(True, True), (False, False), ("auto", False)])
def test_build_context_follows_the_prefetch_setting(tmp_path: Path, setting: bool | str, enabled: bool) -> None:
    """``[worker] prefetch`` decides whether a worker has a prefetcher; ``auto`` is off on the CPU."""
    settings = Settings(storage=StorageSettings(root=tmp_path / "spool"),
                        database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'c.db'}"),
                        worker=WorkerSettings(device="cpu", prefetch=setting))  # type: ignore[arg-type]
    ctx = build_context(settings)
    try:
        assert (ctx.prefetcher is not None) is enabled
    finally:
        if ctx.prefetcher is not None:
            ctx.prefetcher.close()
        ctx.catalog.close()
