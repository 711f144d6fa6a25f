"""The ct-lung-nodules model against chest phantoms with spheres of known position and size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_node.demo import axial_affine
from inference import PermanentError, Prediction, Segment, Volume
from inference.model import Model
from inference.models.lung_nodules import MASS_LABEL, NODULE_LABEL, LungNoduleModel, convex_fill
from inference.prediction import DIAMETER, ML, MM, VOLUME, SegmentKind
from tests.support.chest_nodules import NodulePhantom, chest_spec, make_nodule_phantom, match_findings

CPU = torch.device("cpu")

# (pixel mm, slice mm, seed): fine, medium and thick slices, each with its own noise and layout.
CASES = [(1.2, 1.25, 1), (1.4, 2.5, 0), (1.4, 5.0, 2), (1.3, 2.0, 3)]
DIAMETERS = [4, 6, 8, 10, 14, 20, 30, 8, 12, 10, 16, 25]
PLACEMENTS = ["free"] * 7 + ["lateral", "mediastinal", "anterior", "posterior", "lateral"]


def _phantom(pixel: float, slices_mm: float, seed: int, diameters: list[int]) -> NodulePhantom:
    spec = chest_spec(
        pixel_spacing=pixel,
        slice_spacing=slices_mm,
        rows=round(180 / pixel),
        columns=round(224 / pixel),
        slices=round(140 / slices_mm),
        seed=seed,
        noise_hu=15.0,
    )
    placements = PLACEMENTS[: len(diameters)]
    return make_nodule_phantom(spec, diameters, placements, vessels=10, seed=seed)  # type: ignore[arg-type]


def _volume(case: NodulePhantom) -> Volume:
    return Volume(case.phantom.hu, case.phantom.affine, "CT")




def _measure(segment: Segment, name: object) -> float:
    return next(m.value for m in segment.measurements if m.name == name)


@pytest.fixture(scope="module")
def model() -> LungNoduleModel:
    return LungNoduleModel(CPU)


@pytest.fixture(scope="module")
def results(model: LungNoduleModel) -> list[tuple[NodulePhantom, Prediction]]:
    out = []
    for pixel, slices_mm, seed in CASES:
        case = _phantom(pixel, slices_mm, seed, DIAMETERS)
        out.append((case, model.predict(_volume(case))))
    return out


def test_model_meets_protocol(model: LungNoduleModel) -> None:
    """The model declares name, version, CT only and lesion labels coded as SNOMED CT Nodule and Mass."""
    assert isinstance(model, Model)
    assert (model.name, model.version, model.modalities) == ("ct-lung-nodules", "1.0.0", {"CT"})
    assert model.labels == (NODULE_LABEL, MASS_LABEL)
    assert NODULE_LABEL.kind is SegmentKind.LESION and MASS_LABEL.kind is SegmentKind.LESION
    assert (NODULE_LABEL.type.value, NODULE_LABEL.type.scheme_designator) == ("27925004", "SCT")
    assert (MASS_LABEL.type.value, MASS_LABEL.type.scheme_designator) == ("4147007", "SCT")
    assert NODULE_LABEL.category.value == "49755003" and MASS_LABEL.category.value == "49755003"


def test_recall_for_nodules_of_6_mm_and_more(
    results: list[tuple[NodulePhantom, Prediction]],
) -> None:
    """At least 90 % of nodules >= 6 mm, free or touching wall/mediastinum, are found."""
    found = total = 0
    for case, prediction in results:
        for m in match_findings(case, prediction)[0]:
            if m.diameter_mm >= 6:
                total += 1
                found += m.segment is not None
    assert total == len(CASES) * (len(DIAMETERS) - 1)
    assert found / total >= 0.9, f"recall {found}/{total}"


def test_juxtapleural_nodules_are_found(results: list[tuple[NodulePhantom, Prediction]]) -> None:
    """Nodules embedded in the chest wall or mediastinum are not cut away with the wall."""
    wall = [m for case, p in results for m in match_findings(case, p)[0] if m.placement != "free"]
    assert len(wall) == 5 * len(CASES)
    assert sum(m.segment is not None for m in wall) >= 0.9 * len(wall)


def test_centre_and_diameter_accuracy(results: list[tuple[NodulePhantom, Prediction]]) -> None:
    """Every matched nodule's centre is within 2 mm and its long-axis diameter within 20 %."""
    for case, prediction in results:
        for m in match_findings(case, prediction)[0]:
            if m.segment is None:
                continue
            assert m.centre_error_mm is not None and m.centre_error_mm <= 2.0, m
            diameter = _measure(m.segment, DIAMETER)
            assert abs(diameter / m.diameter_mm - 1.0) <= 0.2, (m, diameter)


def test_free_nodule_volume(results: list[tuple[NodulePhantom, Prediction]]) -> None:
    """Free nodules >= 6 mm have their partial-volume weighted volume within 20 % of truth."""
    for case, prediction in results:
        for m in match_findings(case, prediction)[0]:
            if m.segment is None or m.placement != "free" or m.diameter_mm < 6:
                continue
            truth = np.pi / 6.0 * m.diameter_mm**3 / 1000.0
            assert abs(_measure(m.segment, VOLUME) / truth - 1.0) <= 0.2, m


def test_at_most_one_false_positive_per_scan(
    results: list[tuple[NodulePhantom, Prediction]],
) -> None:
    """Vessel-like tubes, the spine and the walls give at most one false finding per scan."""
    for case, prediction in results:
        assert len(match_findings(case, prediction)[1]) <= 1


def test_segment_fields(results: list[tuple[NodulePhantom, Prediction]]) -> None:
    """Findings are sorted by confidence and carry ids, units, key slice and a closed outline."""
    case, prediction = results[1]
    segments = prediction.segments
    assert segments
    confidences = [s.confidence for s in segments]
    assert confidences == sorted(confidences, reverse=True)  # type: ignore[type-var]
    assert [s.tracking_id for s in segments] == [f"Nodule {i + 1}" for i in range(len(segments))]
    vol = _volume(case)
    for seg in segments:
        assert seg.label == NODULE_LABEL and seg.mask.shape == vol.shape
        assert seg.confidence is not None and 0.5 <= seg.confidence <= 1.0
        units = {m.name: m.unit for m in seg.measurements}
        assert units == {DIAMETER: MM, VOLUME: ML}
        per_slice = seg.mask.sum(axis=(1, 2))
        assert seg.key_slice is not None and per_slice[seg.key_slice] == per_slice.max()
        assert seg.outline is not None and seg.outline.shape[0] >= 9 and seg.outline.shape[1] == 3
        np.testing.assert_allclose(seg.outline[0], seg.outline[-1])
        # Every outline point lies on the key slice's plane...
        index = vol.patient_to_index(seg.outline)
        np.testing.assert_allclose(index[:, 0], seg.key_slice, atol=1e-6)
        # ...and on the boundary of the key slice's cross-section (within a pixel).
        rr, cc = np.nonzero(seg.mask[seg.key_slice])
        dist = np.hypot(index[:, 1:2] - rr[None, :], index[:, 2:3] - cc[None, :]).min(axis=1)
        assert dist.max() <= 1.0


def test_outline_traces_a_sphere_section(model: LungNoduleModel) -> None:
    """The outline of a 20 mm free sphere is a circle of the section's radius around its centre."""
    case = _phantom(1.4, 2.5, 5, [20])
    prediction = model.predict(_volume(case))
    seg = match_findings(case, prediction)[0][0].segment
    assert seg is not None and seg.outline is not None and seg.key_slice is not None
    z = _volume(case).index_to_patient(np.array([seg.key_slice, 0, 0]))[2]
    centre = np.array(case.phantom.nodules[0].centre)
    section_radius = np.sqrt(10.0**2 - (z - centre[2]) ** 2)
    radii = np.linalg.norm(seg.outline[:, :2] - centre[:2], axis=1)
    assert np.all(np.abs(radii - section_radius) <= 1.4), (radii, section_radius)


def test_no_nodule_gives_an_empty_prediction(model: LungNoduleModel) -> None:
    """A chest with vessels but no nodule yields no finding and a note saying so."""
    for pixel, slices_mm, seed in [(1.4, 2.5, 11)]:
        case = _phantom(pixel, slices_mm, seed, [])
        prediction = model.predict(_volume(case))
        assert len(prediction.segments) <= 1
        if not prediction.segments:
            assert prediction.notes == ["no nodule or mass of 4-100 mm found"]


def test_rejects_non_ct(model: LungNoduleModel) -> None:
    """An MR volume is refused with a sentence naming the modality."""
    case = _phantom(1.4, 5.0, 0, [])
    with pytest.raises(PermanentError, match="CT only, got modality 'MR'"):
        model.predict(Volume(case.phantom.hu, case.phantom.affine, "MR"))


def test_rejects_a_volume_too_small_for_a_chest(model: LungNoduleModel) -> None:
    """A 40 mm wide CT volume is refused as too small to be a chest."""
    hu = np.full((10, 40, 40), -850.0, dtype=np.float32)
    with pytest.raises(PermanentError, match="too small to be a chest"):
        model.predict(Volume(hu, axial_affine(hu.shape, 1.0, 2.0), "CT"))


def test_rejects_a_volume_without_lungs(model: LungNoduleModel) -> None:
    """A CT of solid tissue (no air inside the body) is refused: it is not a chest CT."""
    hu = np.full((20, 128, 128), 40.0, dtype=np.float32)
    hu[:, :, :8] = -1000.0
    with pytest.raises(PermanentError, match="no lung found"):
        model.predict(Volume(hu, axial_affine(hu.shape, 1.5, 2.5), "CT"))


def test_convex_fill_bridges_a_dent() -> None:
    """The hull of a disc with a bite out of its edge covers the bite, nothing outside the disc."""
    yy, xx = np.mgrid[:41, :41]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2
    bite = (yy - 20) ** 2 + (xx - 35) ** 2 <= 5**2
    filled = convex_fill(disc & ~bite)
    assert filled[bite & disc & (xx <= 33)].all()
    assert not filled[~disc].any()
