"""ct-lung-nodules on lung masses: chest phantoms with masses against the mediastinum, the chest
wall and the diaphragm, and a real chest CT with an annotated tumour (when present beside the
repository)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.demo import SeriesInfo, slice_datasets, write_datasets
from dicom_node.imaging.loading import load_series
from dicom_node.results import encode_results
from inference import Prediction, Volume
from inference.models.lung_nodules import (
    MASS_LABEL,
    MIN_DIAMETER_MM,
    NODULE_LABEL,
    LungNoduleModel,
)
from inference.prediction import DIAMETER
from tests.conftest import missing_part
from tests.support.chest_masses import (
    MASS_SET,
    LesionMatch,
    MassPhantom,
    mass_set_case,
    mass_spec,
    match_lesions,
)
from tests.support.chest_nodules import make_nodule_phantom

CPU = torch.device("cpu")
REAL_SERIES = "chest_ct_siemens_b40f_tumour"

pytestmark = pytest.mark.slow


def _diameter(segment: object) -> float:
    return next(m.value for m in segment.measurements if m.name == DIAMETER)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model() -> LungNoduleModel:
    return LungNoduleModel(CPU)


@pytest.fixture(scope="module")
def mass_results(model: LungNoduleModel) -> list[tuple[MassPhantom, Prediction]]:
    out = []
    for index in range(len(MASS_SET)):
        case = mass_set_case(index)
        out.append((case, model.predict(Volume(case.phantom.hu, case.phantom.affine, "CT"))))
    return out


def _matches(results: list[tuple[MassPhantom, Prediction]]) -> list[LesionMatch]:
    return [m for case, prediction in results for m in match_lesions(case, prediction)[0]]


def test_the_phantom_set_covers_every_wall(mass_results: list[tuple[MassPhantom, Prediction]]) -> None:
    """The set has masses against the mediastinum, the chest wall and the diaphragm, from 35 to
    80 mm, on 1.25-8 mm slices, with nodules beside them and one chest without any lesion."""
    masses = [m.lesion for m in _matches(mass_results) if m.lesion.kind == "Mass"]
    sites = {lesion.site for lesion in masses}
    assert {"mediastinal", "diaphragmatic"} <= sites and sites & {"lateral", "anterior", "posterior"}
    assert min(lesion.diameter_mm for lesion in masses) <= 35 and max(lesion.diameter_mm for lesion in masses) >= 80
    assert {slices for _, slices, _, _ in MASS_SET} >= {1.25, 8.0}
    assert any(not lesions for *_, lesions in MASS_SET)


def test_every_mass_is_found_with_its_size_and_type(mass_results: list[tuple[MassPhantom, Prediction]]) -> None:
    """Each mass, whatever wall it grows from, is one finding typed Mass whose centre lies within
    its radius and whose long-axis diameter is within 30 % of the truth."""
    masses = [m for m in _matches(mass_results) if m.lesion.kind == "Mass"]
    assert len(masses) == 11
    for m in masses:
        assert m.segment is not None, m.lesion
        assert m.segment.label == MASS_LABEL and m.segment.tracking_id.startswith("Mass "), m
        assert m.diameter_mm is not None and abs(m.diameter_mm / m.lesion.diameter_mm - 1.0) <= 0.3, m


def test_nodules_beside_masses_stay_nodules(mass_results: list[tuple[MassPhantom, Prediction]]) -> None:
    """Nodules of 8-25 mm in the same chests: at least 4 of the 5 found, each typed Nodule."""
    nodules = [m for m in _matches(mass_results) if m.lesion.kind == "Nodule"]
    assert len(nodules) == 5
    found = [m for m in nodules if m.segment is not None]
    assert len(found) >= 4
    for m in found:
        assert m.segment is not None and m.segment.label == NODULE_LABEL, m
        assert m.diameter_mm is not None and abs(m.diameter_mm / m.lesion.diameter_mm - 1.0) <= 0.3, m


def test_at_most_one_false_positive_per_scan(mass_results: list[tuple[MassPhantom, Prediction]]) -> None:
    """Heart, hilum and diaphragm domes that the lung hull reaches into give at most one false
    finding per scan, and none on the chest without lesions."""
    for case, prediction in mass_results:
        false_positives = match_lesions(case, prediction)[1]
        assert len(false_positives) <= (1 if case.lesions else 0), [(f.tracking_id, f.centre) for f in false_positives]
    empty = [p for case, p in mass_results if not case.lesions]
    assert empty and all(p.notes == ["no nodule or mass of 4-100 mm found"] for p in empty)


def test_findings_are_merged_in_3d(mass_results: list[tuple[MassPhantom, Prediction]]) -> None:
    """No two findings of a scan are pieces of one lesion: no centre lies within another
    finding's radius in-plane and one slice of it head to foot."""
    for case, prediction in mass_results:
        step = case.phantom.spacing[0]
        for i, a in enumerate(prediction.segments):
            for b in prediction.segments[i + 1 :]:
                assert a.centre is not None and b.centre is not None
                d = np.array(a.centre) - np.array(b.centre)
                reach = max(_diameter(a), _diameter(b)) / 2.0
                assert np.hypot(d[0], d[1]) > reach or abs(d[2]) > reach + step, (a.tracking_id, b.tracking_id)


def test_the_4_mm_floor_holds(model: LungNoduleModel) -> None:
    """Nothing reported measures below 4 mm, and nodules of 3 mm or less are never reported."""
    spec = mass_spec(seed=7)
    case = make_nodule_phantom(spec, (2.5, 3.0, 3.0, 2.5, 6.0), ("free",) * 5, vessels=12, seed=7)
    prediction = model.predict(Volume(case.phantom.hu, case.phantom.affine, "CT"))
    assert prediction.segments, "the 6 mm nodule is found"
    assert all(_diameter(s) >= MIN_DIAMETER_MM for s in prediction.segments)
    for nodule in case.phantom.nodules[:4]:
        near = [s for s in prediction.segments if np.linalg.norm(np.array(s.centre) - np.array(nodule.centre)) <= 3.0]
        assert not near, (nodule, [_diameter(s) for s in near])


def test_masses_encode_as_seg_and_sr(tmp_path: Path, model: LungNoduleModel) -> None:
    """Through the worker's path (files -> load_series -> model -> encoders), a mass is a SEG
    segment and an SR finding coded (4147007, SCT, "Mass"), a nodule (27925004, SCT)."""
    case = mass_set_case(3)
    datasets = slice_datasets(case.phantom.hu, case.phantom.affine, SeriesInfo(seed="lung-masses"))
    loaded = load_series(write_datasets(datasets, tmp_path / "src"))
    prediction = model.predict(loaded.volume)
    encoded = encode_results(prediction, loaded.volume, loaded.sources, loaded.frame_refs)
    assert encoded.seg is not None
    types = [item.SegmentedPropertyTypeCodeSequence[0].CodeValue for item in encoded.seg.SegmentSequence]
    assert types.count("4147007") == 3 and types.count("27925004") == 1
    labels = [item.SegmentLabel for item in encoded.seg.SegmentSequence]
    # Each segment is labelled with its finding's tracking id (distinct labels, issue 16).
    assert sorted(labels) == ["Mass 1", "Mass 2", "Mass 3", "Nodule 1"]

    findings: list[str] = []

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Finding":
                findings.append(item.ConceptCodeSequence[0].CodeValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(encoded.sr.ContentSequence)
    # Three groups per lesion (volume, key-slice outline, centre), each with the finding type.
    assert sorted(findings) == sorted(["27925004"] * 3 + ["4147007"] * 9)


# -- the real chest CT -----------------------------------------------------------------------------


def shared_data() -> Path | None:
    """The sibling folder ``../shared/data`` of the repository (of the main checkout for a git
    worktree), or None."""
    root = Path(__file__).resolve().parents[2]
    candidates = [root.parent / "shared" / "data"]
    git = root / ".git"
    if git.is_file():  # a worktree: "gitdir: <main checkout>/.git/worktrees/<name>"
        gitdir = Path(git.read_text(encoding="utf-8").split(":", 1)[1].strip())
        candidates.append(gitdir.parents[2].parent / "shared" / "data")
    return next((c for c in candidates if (c / REAL_SERIES).is_dir()), None)


def test_real_chest_ct_tumour_is_found(model: LungNoduleModel) -> None:
    """On a real chest CT (TCIA Lung-PET-CT-Dx, 30 x 8 mm, Siemens B40f) with a tumour against
    the mediastinum, loaded as the worker loads it: a finding lies inside the annotated tumour
    box (+10 mm), its diameter is within 30 % of the box's longest in-plane side, it is a Mass,
    and there are at most 3 other findings."""
    data = shared_data()
    if data is None:
        missing_part(f"real CT {REAL_SERIES} not found in ../shared/data")
    box = json.loads((data / f"{REAL_SERIES}.json").read_text(encoding="utf-8"))["tumour_bbox_mm"]
    lo, hi = np.array(box["lo"]) - 10.0, np.array(box["hi"]) + 10.0
    longest = float(max(box["hi"][0] - box["lo"][0], box["hi"][1] - box["lo"][1]))
    loaded = load_series(sorted((data / REAL_SERIES).glob("*.dcm")))
    assert loaded.volume.shape[0] == 30
    prediction = model.predict(loaded.volume)
    inside = [s for s in prediction.segments if np.all((lo <= np.array(s.centre)) & (np.array(s.centre) <= hi))]
    hits = [s for s in inside if abs(_diameter(s) / longest - 1.0) <= 0.3]
    assert hits, [(s.tracking_id, s.centre, _diameter(s)) for s in prediction.segments]
    assert hits[0].label == MASS_LABEL
    assert len(prediction.segments) - 1 <= 3


def test_pieces_of_one_lesion_on_adjacent_slices_are_grouped() -> None:
    """Two pieces of a 6 mm spot on adjacent 8 mm slices are one group; a piece two slices away,
    or one beside it in-plane beyond its radius, stays apart."""
    from dicom_node.demo import axial_affine
    from inference.models.lung_nodules import _Candidate, _merge_groups

    volume = Volume(np.zeros((10, 64, 64), dtype=np.float32), axial_affine((10, 64, 64), 1.0, 8.0), "CT")

    def piece(label: int, index: tuple[float, float, float], confidence: float) -> _Candidate:
        return _Candidate(label, 10.0, np.array(index), 6.0, 5.0, 1.0, 600.0, 1.0, confidence)

    a = piece(1, (4.0, 30.0, 30.0), 0.9)
    b = piece(2, (5.0, 31.0, 30.0), 0.7)  # next slice, 1 mm beside: the same spot
    c = piece(3, (7.0, 30.0, 30.0), 0.8)  # three slices up: another lesion
    d = piece(4, (4.0, 30.0, 40.0), 0.6)  # 10 mm beside in-plane: another lesion
    groups = _merge_groups([b, c, a, d], volume)
    assert sorted(sorted(x.label for x in g) for g in groups) == [[1, 2], [3], [4]]
    assert next(g for g in groups if len(g) == 2)[0] is a  # the most confident piece leads
