"""`dicom-node demo DIR` writes the quickstart's chest CT, and its 20 mm nodule is really there:
ct-lung-nodules finds one nodule of about 20 mm at the documented place, read back from the
DICOM files the command wrote (as a worker reads them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from dicom_node.demo import DEMO_NODULE
from dicom_node.imaging.loading import load_series
from inference.models.lung_nodules import NODULE_LABEL, LungNoduleModel
from inference.prediction import DIAMETER


def test_demo_series_has_the_nodule_the_quickstart_promises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path / "phantom"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == 48 and out["nodule"]["diameter_mm"] == 20.0
    paths = sorted((tmp_path / "phantom").glob("*.dcm"))
    assert len(paths) == 48
    loaded = load_series(paths)
    prediction = LungNoduleModel(torch.device("cpu")).predict(loaded.volume)
    [finding] = prediction.segments  # the nodule, and no false positive
    assert finding.label == NODULE_LABEL
    diameter = next(m.value for m in finding.measurements if m.name == DIAMETER)
    assert abs(diameter - 20.0) <= 2.0, diameter
    assert finding.centre is not None
    assert np.linalg.norm(np.subtract(finding.centre, DEMO_NODULE.centre)) <= 4.0, finding.centre


def test_demo_refuses_a_file_as_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", str(target)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
