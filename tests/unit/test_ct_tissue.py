"""The ct-tissue model against the analytic truth of the synthetic chest phantom."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from pydicom.sr.codedict import codes

from dicom_node.demo import ChestSpec, Phantom, make_chest_phantom
from inference import PermanentError, Prediction, Volume
from inference.model import Model
from inference.models.ct_tissue import CtTissueModel
from inference.prediction import HU, MEAN, ML, VOLUME, SegmentKind

CPU = torch.device("cpu")
#: The project's acceptance criterion for lungs and body.
ACCEPTANCE = 0.03
#: Bone: the 250 HU threshold counts voxels a third filled with bone (partial volume of a
#: 15 mm spine in 3.5 mm pixels), about +7 %.  Fat: voxels where the fat rim meets air fall
#: below -190 HU, about -10 %.
BONE_TOLERANCE = 0.12
FAT_TOLERANCE = 0.15
#: Model segment name -> phantom truth key.
TRUTH = {"body": "body", "lungs": "lungs", "bone": "bone", "adipose tissue": "fat"}

LARGE_ANISOTROPIC = ChestSpec(
    rows=128,
    columns=160,
    slices=40,
    pixel_spacing=2.5,
    slice_spacing=2.0,
    body_axes=(180.0, 130.0),
    lung_axes=(55.0, 70.0, 35.0),
    lung_offset_x=85.0,
    spine_y=95.0,
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _run(phantom: Phantom, hu: np.ndarray | None = None) -> Prediction:
    volume = Volume(array=phantom.hu if hu is None else hu, affine=phantom.affine, modality="CT")
    return CtTissueModel(CPU).predict(volume)


def _check_against_truth(
    prediction: Prediction, phantom: Phantom, min_dice: dict[str, float]
) -> None:
    by_name = {s.label.name: s for s in prediction.segments}
    assert sorted(by_name) == sorted(TRUTH)
    tolerance = {
        "body": ACCEPTANCE,
        "lungs": ACCEPTANCE,
        "bone": BONE_TOLERANCE,
        "adipose tissue": FAT_TOLERANCE,
    }
    for name, key in TRUTH.items():
        segment = by_name[name]
        volume_ml = segment.measurements[0].value
        truth = phantom.volumes_ml[key]
        assert abs(volume_ml / truth - 1) <= tolerance[name], (
            f"{name}: {volume_ml:.1f} ml vs {truth:.1f} ml"
        )
        assert _dice(segment.mask, phantom.masks[key]) >= min_dice[name], name


def test_default_phantom_volumes_and_dice() -> None:
    """Lungs and body are within 3 % of the analytic volume, bone and fat within tolerance."""
    phantom = make_chest_phantom()
    prediction = _run(phantom)
    assert prediction.model_name == "ct-tissue" and prediction.model_version == "1.0.0"
    _check_against_truth(
        prediction, phantom, {"body": 0.99, "lungs": 0.98, "bone": 0.95, "adipose tissue": 0.9}
    )
    assert prediction.notes == []


def test_measurements_are_volume_and_mean_hu() -> None:
    """Each segment reports its volume in ml (= voxel count x voxel volume) and its mean HU."""
    phantom = make_chest_phantom()
    prediction = _run(phantom)
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    expected_hu = {"body": None, "lungs": -850.0, "bone": 700.0, "adipose tissue": -100.0}
    for segment in prediction.segments:
        assert segment.label.kind is SegmentKind.REGION
        assert segment.mask.dtype == np.bool_ and segment.mask.shape == phantom.hu.shape
        volume, mean = segment.measurements
        assert (volume.name, volume.unit, mean.name, mean.unit) == (VOLUME, ML, MEAN, HU)
        assert volume.value == pytest.approx(segment.mask.sum() * voxel_ml)
        assert mean.value == pytest.approx(float(phantom.hu[segment.mask].mean()), abs=1e-3)
        target = expected_hu[segment.label.name]
        if target is not None:
            # Partial-volume edges pull the mean towards the neighbouring tissue.
            assert abs(mean.value - target) < 0.15 * abs(target) + 20, segment.label.name


def test_larger_anisotropic_phantom() -> None:
    """Another spacing (2.5 mm pixels, 2 mm slices) and a larger body keep the same accuracy."""
    phantom = make_chest_phantom(LARGE_ANISOTROPIC)
    _check_against_truth(
        _run(phantom), phantom, {"body": 0.99, "lungs": 0.98, "bone": 0.95, "adipose tissue": 0.9}
    )


def test_noisy_phantom() -> None:
    """With 25 HU of noise the volumes stay within tolerance."""
    phantom = make_chest_phantom(ChestSpec(noise_hu=25.0, seed=3))
    _check_against_truth(
        _run(phantom), phantom, {"body": 0.99, "lungs": 0.98, "bone": 0.95, "adipose tissue": 0.88}
    )


def test_table_and_noise_outside_the_body_are_removed() -> None:
    """A table under the body, a thin strap to it and bright specks in the air are not body."""
    phantom = make_chest_phantom()
    hu = phantom.hu.copy()
    spec = phantom.spec
    rows = np.arange(spec.rows) * spec.pixel_spacing + phantom.affine[1, 3]  # y of each row
    table_rows = (rows > spec.body_axes[1] + 10) & (rows < spec.body_axes[1] + 25)
    hu[:, table_rows, 5:-5] = 200.0
    # A one-pixel-wide strap from the table up to the body, in every slice.
    centre = spec.columns // 2
    hu[:, (rows > spec.body_axes[1] - 5) & (rows <= spec.body_axes[1] + 10), centre] = 40.0
    specks = np.random.default_rng(1).random(hu.shape) < 0.002
    hu[specks & ~phantom.masks["body"]] = 100.0
    prediction = _run(phantom, hu)
    body = next(s for s in prediction.segments if s.label.name == "body")
    assert not body.mask[:, table_rows, :].any()
    # Specks touching the skin are indistinguishable from it; any farther out are not body.
    near_skin = ndi.binary_dilation(phantom.masks["body"], np.ones((1, 5, 5), dtype=bool))
    assert not (body.mask & specks & ~near_skin).any()
    assert abs(body.measurements[0].value / phantom.volumes_ml["body"] - 1) <= ACCEPTANCE
    assert _dice(body.mask, phantom.masks["body"]) >= 0.99


def test_lungs_exclude_air_connected_to_the_outside() -> None:
    """A notch of outside air cut into the chest wall is not lung; lung volume stays within 3 %."""
    phantom = make_chest_phantom()
    hu = phantom.hu.copy()
    mid = phantom.spec.rows // 2
    hu[:, mid - 2 : mid + 2, :12] = -1000.0  # air reaching in from the right side of the image
    prediction = _run(phantom, hu)
    lungs = next(s for s in prediction.segments if s.label.name == "lungs")
    assert not lungs.mask[:, mid - 2 : mid + 2, :12].any()
    assert abs(lungs.measurements[0].value / phantom.volumes_ml["lungs"] - 1) <= ACCEPTANCE


def test_labels_carry_real_dicom_codes() -> None:
    """Every label's category and type are the SNOMED CT concepts of DICOM's code lists."""
    model: Model = CtTissueModel(CPU)
    assert isinstance(model, Model)
    assert model.modalities == frozenset({"CT"})
    expected = {
        "body": (codes.SCT.AnatomicalStructure, codes.SCT.EntireBody),
        "lungs": (codes.SCT.AnatomicalStructure, codes.SCT.Lung),
        "bone": (codes.SCT.Tissue, codes.SCT.BoneTissue),
        "adipose tissue": (codes.SCT.Tissue, codes.SCT.AdiposeTissue),
    }
    assert [label.name for label in model.labels] == list(expected)
    for label in model.labels:
        for ours, theirs in zip((label.category, label.type), expected[label.name], strict=True):
            assert (ours.value, ours.scheme_designator, ours.meaning) == (
                theirs.value,
                theirs.scheme_designator,
                theirs.meaning,
            )


def test_rejects_other_modality() -> None:
    """An MR volume is refused with a sentence naming the modality."""
    phantom = make_chest_phantom()
    with pytest.raises(PermanentError, match="ct-tissue accepts CT, got MR"):
        CtTissueModel(CPU).predict(Volume(array=phantom.hu, affine=phantom.affine, modality="MR"))


def test_rejects_too_few_slices_and_too_small_images() -> None:
    """Two slices, or 20x20-pixel slices, are refused with the sizes seen."""
    phantom = make_chest_phantom()
    model = CtTissueModel(CPU)
    with pytest.raises(PermanentError, match="at least 3 slices, got 2"):
        model.predict(Volume(array=phantom.hu[:2], affine=phantom.affine, modality="CT"))
    with pytest.raises(PermanentError, match="at least 32x32 pixels, got 20x20"):
        model.predict(Volume(array=phantom.hu[:, :20, :20], affine=phantom.affine, modality="CT"))


def test_rejects_volume_without_body() -> None:
    """An image of air with a few noise specks has no body."""
    phantom = make_chest_phantom()
    air = np.random.default_rng(2).normal(-1000.0, 10.0, phantom.hu.shape).astype(np.float32)
    air[3, 10, 10] = 50.0
    message = (
        r"ct-tissue found no body: the largest region above -500 HU thicker than 6 mm is 0\.0 ml"
    )
    with pytest.raises(PermanentError, match=message):
        CtTissueModel(CPU).predict(Volume(array=air, affine=phantom.affine, modality="CT"))


def test_rejects_non_finite_values() -> None:
    """A volume with NaN voxels is refused."""
    phantom = make_chest_phantom()
    hu = phantom.hu.copy()
    hu[0, 0, 0] = np.nan
    with pytest.raises(PermanentError, match="NaN or inf"):
        _run(phantom, hu)


def test_empty_lungs_become_a_note() -> None:
    """An image without lungs reports the other tissues and notes that no lungs were found."""
    phantom = make_chest_phantom()
    hu = phantom.hu.copy()
    hu[phantom.masks["lungs"] | ((hu < -400) & phantom.masks["body"])] = 40.0
    prediction = _run(phantom, hu)
    assert "no lungs found" in prediction.notes
    assert "lungs" not in {s.label.name for s in prediction.segments}


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is false"
)
def test_cuda_matches_cpu() -> None:
    """On CUDA the model gives the same masks and measurements as on the CPU."""
    phantom = make_chest_phantom()
    volume = Volume(array=phantom.hu, affine=phantom.affine, modality="CT")
    cpu = CtTissueModel(CPU).predict(volume)
    gpu = CtTissueModel(torch.device("cuda")).predict(volume)
    assert [s.label for s in gpu.segments] == [s.label for s in cpu.segments]
    for ours, theirs in zip(gpu.segments, cpu.segments, strict=True):
        np.testing.assert_array_equal(ours.mask, theirs.mask)
        for m_gpu, m_cpu in zip(ours.measurements, theirs.measurements, strict=True):
            assert m_gpu.value == pytest.approx(m_cpu.value, rel=1e-6)
