"""Every built-in model's real output, on CT and MR, single-frame and enhanced multi-frame
sources, encodes to SEG + SR that dciodvfy, dsrdump and highdicom accept.

This is the worker's path without Celery: DICOM files → ``load_series`` → model → encoders.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.imaging.loading import load_series
from dicom_node.results import encode_results
from inference.prediction import Prediction
from inference.registry import ModelRegistry
from tests.conftest import require_tool
from tests.support import procs
from tests.support.chest_nodules import chest_spec, make_nodule_phantom
from tests.support.quirks import enhanced
from tests.unit.test_results_seg import check_roundtrip

pytestmark = pytest.mark.integration

REGISTRY = ModelRegistry(torch.device("cpu"))


def run(model: str, files: list[Path]) -> tuple[Prediction, object, object]:
    loaded = load_series(files)
    prediction = REGISTRY.get(model).predict(loaded.volume)
    encoded = encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs)
    return prediction, loaded, encoded


def check_valid(encoded: object, tmp_path: Path, dciodvfy_clean: object) -> dict[str, Path]:
    require_tool("dsrdump")
    paths = {}
    for role in ("seg", "sr"):
        ds = getattr(encoded, role)
        if ds is None:
            continue
        path = tmp_path / f"{role}.dcm"
        ds.save_as(path, enforce_file_format=True)
        dciodvfy_clean(path)  # type: ignore[operator]
        paths[role] = path
    dump = procs.run_tool(["dsrdump", str(paths["sr"])])
    assert dump.returncode == 0 and dump.stderr.strip() == "", dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    return paths


@pytest.mark.parametrize("layout", ["single-frame", "enhanced"])
def test_ct_tissue_output_is_valid(tmp_path: Path, dciodvfy_clean: object, layout: str) -> None:
    """ct-tissue on a CT phantom (single-frame and Legacy Converted Enhanced CT) gives a valid
    SEG whose masks come back exactly and an SR with one volume group per structure."""
    phantom = make_chest_phantom(ChestSpec(slices=24))
    datasets = slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=f"models-ct-{layout}"))
    if layout == "enhanced":
        datasets = [enhanced(datasets, f"models-ct-{layout}")]
    prediction, loaded, encoded = run("ct-tissue", write_datasets(datasets, tmp_path / "src"))
    paths = check_valid(encoded, tmp_path, dciodvfy_clean)
    check_roundtrip(paths["seg"], prediction, loaded.sources, loaded.frame_refs)  # type: ignore[attr-defined]
    sr = hd.sr.srread(paths["sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(prediction.segments) == 4


@pytest.mark.parametrize("layout", ["single-frame", "enhanced"])
def test_foreground_on_mr_is_valid(tmp_path: Path, dciodvfy_clean: object, layout: str) -> None:
    """foreground on an MR series (single-frame and enhanced multi-frame) gives a valid SEG + SR."""
    phantom = make_chest_phantom(ChestSpec(slices=16, noise_hu=5.0))
    mr = np.clip(phantom.hu + 1000.0, 0, None) / 2.0  # air dark, tissue bright: an MR-like image
    datasets = slice_datasets(mr, phantom.affine, SeriesInfo(seed=f"models-mr-{layout}", modality="MR"))
    if layout == "enhanced":
        datasets = [enhanced(datasets, f"models-mr-{layout}")]
    prediction, loaded, encoded = run("foreground", write_datasets(datasets, tmp_path / "src"))
    paths = check_valid(encoded, tmp_path, dciodvfy_clean)
    check_roundtrip(paths["seg"], prediction, loaded.sources, loaded.frame_refs)  # type: ignore[attr-defined]
    truth = phantom.masks["body"]
    dice = 2 * (prediction.segments[0].mask & truth).sum() / (prediction.segments[0].mask.sum() + truth.sum())
    assert dice > 0.95


def test_lung_nodules_output_is_valid_and_placed(tmp_path: Path, dciodvfy_clean: object) -> None:
    """ct-lung-nodules on a chest with two nodules gives a valid SEG (one segment per finding)
    and an SR whose centre points lie within 2 mm of the true centres."""
    nod = make_nodule_phantom(chest_spec(seed=4), (10.0, 14.0), ("free", "lateral"), vessels=4, seed=4)
    phantom = nod.phantom
    datasets = slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="models-nodules"))
    prediction, loaded, encoded = run("ct-lung-nodules", write_datasets(datasets, tmp_path / "src"))
    paths = check_valid(encoded, tmp_path, dciodvfy_clean)
    check_roundtrip(paths["seg"], prediction, loaded.sources, loaded.frame_refs)  # type: ignore[attr-defined]
    sr = hd.sr.srread(paths["sr"])
    centres = sr_centre_points(sr)
    truth = [np.array(s.centre) for s in phantom.nodules]
    assert len(centres) == len(truth) == 2
    for c in truth:
        assert min(np.linalg.norm(np.array(p) - c) for p in centres) <= 2.0


def sr_centre_points(sr: hd.sr.Comprehensive3DSR) -> list[tuple[float, float, float]]:
    """Every SCOORD3D POINT in the report (the findings' centres)."""
    found = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "SCOORD3D" and item.GraphicType == "POINT":
                x, y, z = (float(v) for v in item.GraphicData)
                found.append((x, y, z))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_model_that_finds_nothing_gives_sr_only(tmp_path: Path, dciodvfy_clean: object) -> None:
    """ct-lung-nodules on a chest without nodules gives no SEG and a valid SR that says so."""
    nod = make_nodule_phantom(chest_spec(seed=5), (), vessels=4, seed=5)
    datasets = slice_datasets(nod.phantom.hu, nod.phantom.affine, SeriesInfo(seed="models-empty"))
    prediction, _, encoded = run("ct-lung-nodules", write_datasets(datasets, tmp_path / "src"))
    assert prediction.segments == []
    assert encoded.seg is None  # type: ignore[attr-defined]
    paths = check_valid(encoded, tmp_path, dciodvfy_clean)
    dump = procs.run_tool(["dsrdump", str(paths["sr"])]).stdout
    assert "Absent" in dump
