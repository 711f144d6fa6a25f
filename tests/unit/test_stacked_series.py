"""A series of two regular stacks of different spacing (tilted head CT protocol), end to end.

Real parts: phantom files spooled and recorded in a SQLite catalog, the real loader, the
``ct-tissue`` model run on each stack by ``run_inference``, the SEG + SR encoders, dciodvfy and
highdicom reading the objects back.  Plus the geometry and the joining rules of
``inference.stacks`` on hand-made predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicom_node.catalog import Catalog, JobSpec, JobState
from dicom_node.catalog.recorder import instance_from_file
from dicom_node.demo import ChestSpec, make_chest_phantom, write_datasets
from dicom_node.imaging.loading import load_series
from dicom_node.results import encode_results
from dicom_node.scheduling.jobs import queue_job
from dicom_node.settings import DatabaseSettings, Settings, StorageSettings
from inference.prediction import HU, MEAN, ML, VOLUME, Measurement, Prediction, Segment
from inference.registry import ModelRegistry
from inference.stacks import StackedVolume, join_predictions
from tests.support import quirks
from tests.support.queues import MemoryQueue
from tests.support.result_examples import BODY_LABEL, NODULE_LABEL, circle_outline
from tests.unit.test_results_seg import check_roundtrip, masks_by_slice
from workers.pipeline import WorkerContext, run_inference

SPACINGS = (4.2, 7.4)
COUNTS = (14, 14)
TILT_DEG = 15.0


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[WorkerContext]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    settings = Settings(storage=StorageSettings(root=tmp_path / "spool"),
                        database=DatabaseSettings(url=catalog.url))
    yield WorkerContext(settings, catalog, ModelRegistry(torch.device("cpu")))
    catalog.close()


def _two_stack_series(tmp_path: Path) -> list[Path]:
    phantom = make_chest_phantom(ChestSpec(slices=sum(COUNTS), rows=64, columns=64, pixel_spacing=5.0))
    affine = quirks.tilted_affine(phantom.hu.shape, 5.0, SPACINGS[0], tilt_deg=TILT_DEG)
    affine[:3, 3] = phantom.affine[:3, 3]
    info = quirks.series_info("two-stacks")
    datasets = quirks.with_positions(quirks.stack(phantom.hu, affine, info),
                                     quirks.stacked_positions(affine, COUNTS, SPACINGS))
    return write_datasets(quirks.shuffle_instance_numbers(datasets, seed=1),
                          tmp_path / "spool" / info.uid("study") / info.uid("series"))


def test_two_stack_tilted_series_gives_one_seg_and_sr_on_every_source_image(
    ctx: WorkerContext, tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """ct-tissue runs per stack; one SEG + SR for the series, masks on each stack's own slices."""
    paths = _two_stack_series(tmp_path)
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    ctx.catalog.record_instances([instance_from_file(p, calling_ae_title="CT1") for p in paths])
    ctx.catalog.mark_series_complete(series_uid, "idle")
    (job_id,) = ctx.catalog.create_jobs([JobSpec(series_uid, "test", "ct-tissue", [], "normal")])
    queue_job(ctx.catalog, MemoryQueue(), job_id)
    job = ctx.catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,), count_attempt=True)

    results = run_inference(ctx, job)
    files = {pydicom.dcmread(f, stop_before_pixels=True).Modality: Path(f) for f in results["files"]}
    assert set(files) == {"SEG", "SR"}
    for path in files.values():
        dciodvfy_clean(path)

    # What the model finds on each stack on its own, joined along the slices.
    loaded = load_series(paths)
    assert isinstance(loaded.volume, StackedVolume)
    assert loaded.volume.stacks == ((0, 14), (14, 28))
    model = ctx.registry.get("ct-tissue")
    per_stack = [model.predict(stack) for stack in loaded.volume.stack_volumes()]
    seg = hd.seg.segread(files["SEG"])
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == sum(COUNTS)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert "SpacingBetweenSlices" not in measures  # two spacings: none is the series'
    rebuilt = masks_by_slice(seg, loaded.sources, loaded.frame_refs, loaded.volume.shape)
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    for number, label in enumerate(labels, start=1):
        parts = [next(s.mask for s in p.segments if s.label.name == label) for p in per_stack]
        np.testing.assert_array_equal(rebuilt[number], np.concatenate(parts), err_msg=label)
        assert rebuilt[number][:14].any() and rebuilt[number][14:].any()

    sr = hd.sr.srread(files["SR"])
    body = next(g for g in sr.content.get_volumetric_roi_measurement_groups()
                if g.tracking_identifier == "body")
    volume_ml = next(m.value for m in body.get_measurements() if m.name.meaning == "Volume")
    expected_ml = sum(next(m.value for s in p.segments if s.label.name == "body"
                           for m in s.measurements if m.name == VOLUME) for p in per_stack)
    assert float(volume_ml) == pytest.approx(expected_ml, rel=1e-6)
    notes = [e.value for e in sr.iterall() if e.keyword == "TextValue"]
    assert "processed as 2 regular stacks: 14 slices at 4.2 mm, then 14 slices at 7.4 mm" in notes


def _stacked(shape: tuple[int, int, int] = (6, 8, 8)) -> StackedVolume:
    first = np.eye(4)
    first[:3, 0] = (0.0, 0.5, 2.0)  # tilted step
    first[:3, 1] = (0.0, 1.0, 0.0)
    first[:3, 2] = (1.0, 0.0, 0.0)
    first[:3, 3] = (-10.0, -10.0, 0.0)
    second = first.copy()
    second[:3, 0] = (0.0, 1.0, 4.0)
    second[:3, 3] = first[:3, 3] + 2 * first[:3, 0] + (0.0, 0.75, 3.0)
    return StackedVolume(array=np.zeros(shape, np.float32), affine=first, modality="CT",
                         stacks=((0, 3), (3, 6)), stack_affines=(first, second))


def test_stacked_volume_maps_every_slice_to_its_stack_and_back() -> None:
    """index_to_patient follows each stack's affine; patient_to_index inverts it, tilt included."""
    volume = _stacked()
    index = np.array([[k, r, c] for k in range(6) for r in (0, 7) for c in (0, 3)], dtype=np.float64)
    points = volume.index_to_patient(index)
    for (k, r, c), point in zip(index, points, strict=True):
        stack = 0 if k < 3 else 1
        affine = volume.stack_affines[stack]
        local = k - volume.stacks[stack][0]
        np.testing.assert_allclose(point, affine[:3, :3] @ (local, r, c) + affine[:3, 3], atol=1e-9)
    np.testing.assert_allclose(volume.patient_to_index(points), index, atol=1e-9)


def test_join_sums_region_volumes_weights_means_and_renames_lesions() -> None:
    """A region joins across stacks (ml summed, mean volume-weighted); lesions keep their stack."""
    volume = _stacked()
    masks = []
    for _ in range(2):
        mask = np.zeros((3, 8, 8), bool)
        mask[:, 2:6, 2:6] = True
        masks.append(mask)
    lesion = np.zeros((3, 8, 8), bool)
    lesion[1, 3:5, 3:5] = True
    parts = [
        Prediction("m", "1", [
            Segment(BODY_LABEL, masks[i], [Measurement(VOLUME, 10.0 * (i + 1), ML),
                                           Measurement(MEAN, 100.0 * (i + 1), HU)]),
            Segment(NODULE_LABEL, lesion, tracking_id="Nodule 1", key_slice=1),
        ], notes=["no bone found"])
        for i in range(2)
    ]
    joined = join_predictions(parts, volume)
    body, first, second = joined.segments
    assert body.mask.shape == (6, 8, 8) and body.mask.sum() == 2 * masks[0].sum()
    measured = {m.name: m.value for m in body.measurements}
    assert measured[VOLUME] == pytest.approx(30.0)
    # Voxel volumes 2 and 4 ul: the second stack's mean weighs twice as much.
    assert measured[MEAN] == pytest.approx((100.0 * 1 + 200.0 * 2) / 3)
    assert (first.tracking_id, second.tracking_id) == ("Nodule 1", "Nodule 1 (stack 2)")
    assert (first.key_slice, second.key_slice) == (1, 4)
    assert second.mask[4].sum() == 4 and not second.mask[:3].any()
    assert joined.notes == ["processed as 2 regular stacks: 3 slices at 2.06 mm, then 3 slices at 4.12 mm",
                            "no bone found"]


def test_two_stack_enhanced_ct_gives_a_seg_on_its_frames(
    tmp_path: Path, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """The same two stacks as one enhanced multi-frame CT: a SEG whose frames name their frames."""
    phantom = make_chest_phantom(ChestSpec(slices=sum(COUNTS), rows=64, columns=64, pixel_spacing=5.0))
    affine = quirks.tilted_affine(phantom.hu.shape, 5.0, SPACINGS[0], tilt_deg=TILT_DEG)
    info = quirks.series_info("two-stacks-enhanced")
    datasets = quirks.with_positions(quirks.stack(phantom.hu, affine, info),
                                     quirks.stacked_positions(affine, COUNTS, SPACINGS))
    enhanced = quirks.functional_group_layout(quirks.enhanced(datasets, "two-stacks-enhanced"), "per-frame")
    loaded = load_series(write_datasets([enhanced], tmp_path / "ct"))
    assert isinstance(loaded.volume, StackedVolume) and loaded.volume.stacks == ((0, 14), (14, 28))
    prediction = Prediction("m", "1", [Segment(BODY_LABEL, phantom.masks["body"])])
    seg = encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs).seg
    assert seg is not None
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    dciodvfy_clean(path)
    check_roundtrip(path, prediction, loaded.sources, loaded.frame_refs)


def test_lesion_outlines_of_each_stack_land_on_their_own_source_images(tmp_path: Path) -> None:
    """A lesion per stack: the SR draws each outline on the source image of its key slice, at its pixels."""
    phantom = make_chest_phantom(ChestSpec(slices=sum(COUNTS), rows=64, columns=64, pixel_spacing=5.0))
    affine = quirks.tilted_affine(phantom.hu.shape, 5.0, SPACINGS[0], tilt_deg=TILT_DEG)
    datasets = quirks.with_positions(quirks.stack(phantom.hu, affine, quirks.series_info("two-stack-lesions")),
                                     quirks.stacked_positions(affine, COUNTS, SPACINGS))
    loaded = load_series(write_datasets(datasets, tmp_path / "ct"))
    assert isinstance(loaded.volume, StackedVolume)
    parts = []
    for stack in loaded.volume.stack_volumes():
        mask = np.zeros(stack.shape, dtype=bool)
        mask[5, 30:34, 30:34] = True
        centre = stack.index_to_patient(np.array([5.0, 31.5, 31.5]))
        parts.append(Prediction("m", "1", [Segment(
            NODULE_LABEL, mask, tracking_id="Nodule 1", confidence=0.9, centre=tuple(centre), key_slice=5,
            outline=circle_outline(stack, 5, centre, 8.0))]))
    prediction = join_predictions(parts, loaded.volume)
    sr_path = tmp_path / "sr.dcm"
    encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs).sr.save_as(
        sr_path, enforce_file_format=True)
    outlines = {g.tracking_identifier: g.roi for g in hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
                if g.roi is not None and g.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE}
    for name, key_slice in (("Nodule 1", 5), ("Nodule 1 (stack 2)", 19)):
        source = loaded.sources[loaded.frame_refs[key_slice][0]]
        roi = outlines[name]
        assert roi.ContentSequence[0].referenced_sop_instance_uid == source.SOPInstanceUID
        # (column, row) of the pixel centres, +0.5: the circle is centred on pixel (31.5, 31.5).
        np.testing.assert_allclose(roi.value[:-1].mean(axis=0), (32.0, 32.0), atol=1e-3)
