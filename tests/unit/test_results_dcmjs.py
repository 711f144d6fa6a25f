"""The libraries behind OHIF and Cornerstone3D (npm dcmjs 0.52 and @cornerstonejs/adapters 5.6,
the versions OHIF 3.13.2 bundles) read every SEG and SR of the built-in models, run by node
(tests/viewer/parse_results.mjs; ``npm ci`` in tests/viewer installs them)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dicom_node.results.sr import mask_volume_ml
from inference.prediction import SegmentKind
from inference.volume import Volume
from tests.conftest import missing_part, require_tool
from tests.support.study import Study, build_study

pytestmark = pytest.mark.slow

VIEWER = Path(__file__).resolve().parents[1] / "viewer"


def _node_modules() -> None:
    require_tool("node")
    for package in ("dcmjs", "@cornerstonejs/adapters", "@babel/runtime"):
        if not (VIEWER / "node_modules" / package / "package.json").is_file():
            missing_part(f"npm package {package} not installed (cd tests/viewer && npm ci)")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return build_study(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def parsed(study: Study) -> dict[str, list[dict[str, object]]]:
    """node's summary of each model run's SEG and SR, keyed like ``study.predictions``."""
    _node_modules()
    out = {}
    for key, (series, paths) in study.result_files.items():
        args = ["--sources", *map(str, study.series_files[series]), "--results", *map(str, paths)]
        res = subprocess.run(
            [shutil.which("node") or "node", "parse_results.mjs", *args],
            cwd=VIEWER,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[key] = json.loads(res.stdout)
    return out


def test_cornerstone_reads_every_seg_voxel_for_voxel(
    study: Study, parsed: dict[str, list[dict[str, object]]]
) -> None:
    """The cornerstoneTools labelmap reader finds each segment's voxels on the right slices."""
    assert set(study.seg) == {"ct-tissue", "ct-lung-nodules", "foreground"}
    for key in study.seg:
        (summary,) = [s for s in parsed[key] if s["kind"] == "SEG"]
        present = [s for s in study.predictions[key].segments if s.mask.any()]
        assert summary["labels"] == [s.tracking_id for s in present]
        if summary["overlapping"]:
            continue  # several labelmaps: counts are per labelmap, checked by highdicom elsewhere
        segments = summary["segments"]
        assert isinstance(segments, dict)
        for number, segment in enumerate(present, start=1):
            got = segments[str(number)]
            assert got["voxels"] == int(segment.mask.sum()), (key, segment.tracking_id)
            assert got["slices"] == np.flatnonzero(segment.mask.any(axis=(1, 2))).tolist()


def test_dcmjs_reads_every_sr_finding_with_an_image_region_and_its_values(
    study: Study, parsed: dict[str, list[dict[str, object]]]
) -> None:
    """Merged per tracking UID as OHIF merges them, every finding has a 2D image region on a
    source image and the SEG-derived volume; the Cornerstone3D reader runs without throwing."""
    assert study.phantom is not None
    volume = Volume(study.phantom.hu, study.phantom.affine, "CT")
    for key, prediction in study.predictions.items():
        (summary,) = [s for s in parsed[key] if s["kind"] == "SR"]
        assert summary["template"] == "1500" and summary["title"] == "Imaging Measurement Report"
        findings = summary["findings"]
        assert isinstance(findings, list)
        if not prediction.segments:
            (finding,) = findings
            assert finding["trackingId"] == "No finding"
            assert finding["graphic"]["valueType"] == "SCOORD"
            assert finding["referencedSOPInstanceUID"]
            assert "Absent" in summary["evaluations"]
            continue
        assert [f["trackingId"] for f in findings] == [s.tracking_id for s in prediction.segments]
        for finding, segment in zip(findings, prediction.segments, strict=True):
            graphic = finding["graphic"]
            assert graphic["valueType"] == "SCOORD" and graphic["graphicType"] == "POLYLINE"
            assert finding["referencedSOPInstanceUID"]
            labels = {label["name"]: label["value"] for label in finding["labels"]}
            assert labels["Volume"] == pytest.approx(mask_volume_ml(segment, volume), abs=1e-4)
            if segment.label.kind == SegmentKind.LESION:
                assert {"Diameter", "Certainty of Finding"} <= labels.keys()
                assert finding["findingSite"] == "Lung"
        # Cornerstone3D's own reader takes the lesion centres (SCOORD3D POINT) as Probe points;
        # it skips the other groups (no tool of its own draws them), without throwing.
        lesions = any(s.label.kind == SegmentKind.LESION for s in prediction.segments)
        assert summary["toolTypes"] == (["Probe"] if lesions else []), key
