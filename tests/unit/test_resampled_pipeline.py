"""A tilted CT through the worker to a Slicer-type archive: both SEGs arrive, dcmqi reads one.

Real parts: phantom files spooled and recorded in a SQLite catalog, the real loader, the
``ct-tissue`` model, the encoders, the outbox manifest, C-STORE to a DCMTK storescp and dcmqi's
``segimage2itkimage`` on what the archive received.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.catalog import Catalog, JobSpec, JobState
from dicom_node.catalog.recorder import instance_from_file
from dicom_node.demo import ChestSpec, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.results.resampled import KIND
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import DatabaseSettings, DestinationSettings, Settings, StorageSettings
from inference.registry import ModelRegistry
from tests.support import procs, quirks
from tests.support.queues import MemoryQueue
from tests.unit.test_results_resampled import TILT_DEG, source_indices, to_nrrd
from workers.pipeline import WorkerContext, deliver, read_manifest, run_inference

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def ctx(tmp_path: Path, storescp_archive: procs.Server) -> Iterator[WorkerContext]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    slicer = DestinationSettings(name="slicer", ae_title="ARCHIVE", host=procs.LOOPBACK,
                                 port=storescp_archive.port, outputs=["seg", "sr", KIND])
    settings = Settings(storage=StorageSettings(root=tmp_path / "spool"),
                        database=DatabaseSettings(url=catalog.url), destinations=[slicer])
    yield WorkerContext(settings, catalog, ModelRegistry(torch.device("cpu")))
    catalog.close()


def test_tilted_ct_sends_both_segs_and_dcmqi_reads_the_resampled_one(
    ctx: WorkerContext, tmp_path: Path, storescp_archive: procs.Server
) -> None:
    """A destination with ``outputs = ["seg", "sr", "seg-resampled"]`` receives the source-frame
    SEG, the SR and the resampled SEG of a 15 deg tilted CT; dcmqi converts the received
    resampled SEG to volumes whose voxels are the model's mask voxels."""
    phantom = make_chest_phantom(ChestSpec(slices=12, rows=64, columns=64, pixel_spacing=5.0))
    affine = quirks.tilted_affine(phantom.hu.shape, 5.0, 5.0, TILT_DEG)
    affine[:3, 3] = phantom.affine[:3, 3]
    info = quirks.series_info("resampled-pipeline")
    paths = write_datasets(slice_datasets(phantom.hu, affine, info),
                           tmp_path / "spool" / info.uid("study") / info.uid("series"))
    series_uid = info.uid("series")
    ctx.catalog.record_instances([instance_from_file(p, calling_ae_title="CT1") for p in paths])
    ctx.catalog.mark_series_complete(series_uid, "idle")
    (job_id,) = ctx.catalog.create_jobs([JobSpec(series_uid, "test", "ct-tissue", ["slicer"], "normal")])
    queue_job(ctx.catalog, MemoryQueue(), job_id)
    job = ctx.catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,), count_attempt=True)

    results = run_inference(ctx, job)
    assert results["outputs"] == {"seg": 1, "sr": 1, KIND: 1}
    kinds = [m["output"] for m in read_manifest(Path(results["files"][0]).parent)]
    assert sorted(kinds) == sorted(["seg", "sr", KIND])
    ctx.catalog.set_results(job_id, results)
    ctx.catalog.transition(job_id, JobState.ENCODED)
    job = ctx.catalog.transition(job_id, JobState.DELIVERING)
    assert deliver(ctx, job) == []

    received = [pydicom.dcmread(p) for p in Path(storescp_archive.extra["received"]).rglob("*") if p.is_file()]
    segs: dict[str, Any] = {str(ds.SeriesDescription): ds for ds in received if ds.SOPClassUID == SEG_STORAGE}
    assert len(received) == 3 and len(segs) == 2
    (resampled,) = [ds for name, ds in segs.items() if name.endswith(" orthogonal")]
    files, text = to_nrrd(resampled, tmp_path, "received")
    assert files and "ERROR" not in text, text
    # Each segment's voxels, mapped back through the source geometry, are the SEG's own mask:
    # the count the source-frame SEG has, every voxel on its source plane.
    source = next(ds for name, ds in segs.items() if not name.endswith(" orthogonal"))
    for number, nrrd in enumerate(files, start=1):
        indices = source_indices(nrrd, affine)
        assert float(np.abs(indices[:, 0] - np.rint(indices[:, 0])).max()) < 1e-3
        frames = [i for i, item in enumerate(source.PerFrameFunctionalGroupsSequence)
                  if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number]
        pixels = source.pixel_array if source.NumberOfFrames > 1 else source.pixel_array[None]
        assert len(indices) == int(pixels[frames].astype(bool).sum())
