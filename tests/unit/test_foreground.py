"""The foreground model on a synthetic MR head and on the CT chest phantom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from pydicom.sr.codedict import codes

from dicom_node.demo import ChestSpec, axial_affine, make_chest_phantom
from inference import PermanentError, Volume
from inference.model import Model
from inference.models.foreground import ForegroundModel
from inference.prediction import ML, VOLUME, SegmentKind

CPU = torch.device("cpu")
#: Partial volume at the edge of the object moves the Otsu mask by a fraction of a voxel.
VOLUME_TOLERANCE = 0.04
MIN_DICE = 0.95


@dataclass
class HeadMr:
    """A synthetic T1-like head: image, geometry and truth."""

    image: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    volume_ml: float


def make_head_mr(
    shape: tuple[int, int, int] = (48, 96, 96),
    pixel_spacing: float = 2.2,
    slice_spacing: float = 3.0,
    axes: tuple[float, float, float] = (75.0, 92.0, 65.0),
    noise: float = 25.0,
    bias: float = 0.3,
    seed: int = 0,
) -> HeadMr:
    """Bright scalp, dark skull, grey brain with dark ventricles, on dark Rician noise.

    ``axes`` are the head ellipsoid's semi-axes (x, y, z) in mm; ``bias`` the amplitude of a
    smooth multiplicative bias field (0.3: the intensity varies by +/- 30 % across the head).
    """
    affine = axial_affine(shape, pixel_spacing, slice_spacing)
    k, j, i = np.meshgrid(
        *(np.arange(n, dtype=np.float64) for n in shape), indexing="ij", sparse=True
    )
    ax, ay, az = axes

    def render(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        def inside(shrink: float, cx: float = 0.0, sx: float = 1.0) -> np.ndarray:
            return (
                ((x - cx) / (sx * (ax - shrink))) ** 2
                + (y / (sx * (ay - shrink))) ** 2
                + (z / (sx * (az - shrink))) ** 2
            ) <= 1.0

        img = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float32)
        img[inside(0.0)] = 900.0  # scalp (fat is bright on T1)
        img[inside(4.0)] = 150.0  # skull
        img[inside(10.0)] = 600.0  # brain
        for cx in (-12.0, 12.0):
            img[inside(0.0, cx, 0.15)] = 250.0  # ventricles
        return img

    def coords(dk: float, dj: float, di: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            affine[0, 3] + (i + di) * pixel_spacing,
            affine[1, 3] + (j + dj) * pixel_spacing,
            affine[2, 3] + (k + dk) * slice_spacing,
        )

    acc = np.zeros(shape, dtype=np.float32)
    for dk in (-0.25, 0.25):
        for dj in (-0.25, 0.25):
            for di in (-0.25, 0.25):
                acc += render(*coords(dk, dj, di))
    x, y, z = coords(0.0, 0.0, 0.0)
    field = 1.0 + bias * (x / ax * 0.8 + y / ay * 0.2) * (1.0 - 0.3 * z / az)
    rng = np.random.default_rng(seed)
    real = acc / 8.0 * field + rng.normal(0.0, noise, shape)
    imag = rng.normal(0.0, noise, shape)
    image = np.sqrt(real**2 + imag**2).astype(np.float32)  # magnitude image: Rician noise
    mask = (x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2 <= 1.0
    return HeadMr(
        image,
        affine,
        np.broadcast_to(mask, shape).copy(),
        4.0 / 3.0 * np.pi * ax * ay * az / 1000.0,
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _check(volume: Volume, truth_mask: np.ndarray, truth_ml: float) -> None:
    prediction = ForegroundModel(CPU).predict(volume)
    assert prediction.model_name == "foreground" and prediction.model_version == "1.0.0"
    (segment,) = prediction.segments
    assert segment.label.kind is SegmentKind.REGION
    (measurement,) = segment.measurements
    assert (measurement.name, measurement.unit) == (VOLUME, ML)
    assert measurement.value == pytest.approx(segment.mask.sum() * volume.voxel_volume_ml)
    assert abs(measurement.value / truth_ml - 1) <= VOLUME_TOLERANCE, (
        f"{measurement.value:.1f} vs {truth_ml:.1f} ml"
    )
    assert _dice(segment.mask, truth_mask) >= MIN_DICE


def test_mr_head_with_bias_field() -> None:
    """A noisy MR head with a +/- 30 % bias field: Dice >= 0.95 and volume within 4 %."""
    head = make_head_mr()
    _check(Volume(array=head.image, affine=head.affine, modality="MR"), head.mask, head.volume_ml)


def test_mr_head_other_geometry_and_strong_noise() -> None:
    """Finer pixels, thinner slices, a smaller head and twice the noise keep the same accuracy."""
    head = make_head_mr(
        shape=(60, 112, 112),
        pixel_spacing=1.6,
        slice_spacing=2.0,
        axes=(68.0, 84.0, 55.0),
        noise=50.0,
        bias=0.4,
        seed=4,
    )
    _check(Volume(array=head.image, affine=head.affine, modality="MR"), head.mask, head.volume_ml)


def test_ct_chest_phantom_body() -> None:
    """On the CT chest phantom the foreground is the body (lungs filled in)."""
    phantom = make_chest_phantom(ChestSpec(noise_hu=20.0, seed=2))
    volume = Volume(array=phantom.hu, affine=phantom.affine, modality="CT")
    _check(volume, phantom.masks["body"], phantom.volumes_ml["body"])


def test_head_label_from_body_part_hint() -> None:
    """The segment is coded as the head when the body part says HEAD, else as the entire body."""
    head = make_head_mr(shape=(24, 96, 96), slice_spacing=6.0)
    model = ForegroundModel(CPU)
    hinted = model.predict(
        Volume(array=head.image, affine=head.affine, modality="MR", metadata={"body_part": "head"})
    )
    plain = model.predict(Volume(array=head.image, affine=head.affine, modality="MR"))
    assert hinted.segments[0].label.type.value == codes.SCT.Head.value
    assert plain.segments[0].label.type.value == codes.SCT.EntireBody.value
    np.testing.assert_array_equal(hinted.segments[0].mask, plain.segments[0].mask)


def test_declares_any_modality_and_real_codes() -> None:
    """The model accepts any modality and its labels use DICOM's SNOMED CT concepts."""
    model: Model = ForegroundModel(CPU)
    assert isinstance(model, Model)
    assert model.modalities == frozenset()
    for label, concept in zip(model.labels, (codes.SCT.EntireBody, codes.SCT.Head), strict=True):
        assert (label.type.value, label.type.meaning) == (concept.value, concept.meaning)
        category = codes.SCT.AnatomicalStructure
        assert (label.category.value, label.category.meaning) == (category.value, category.meaning)


def test_rejects_constant_volume() -> None:
    """An all-constant volume has no foreground and is refused."""
    affine = axial_affine((8, 32, 32), 1.0, 1.0)
    with pytest.raises(
        PermanentError, match="foreground needs an image with contrast, every voxel is 7"
    ):
        ForegroundModel(CPU).predict(
            Volume(array=np.full((8, 32, 32), 7.0, np.float32), affine=affine, modality="MR")
        )


def test_rejects_non_finite_and_tiny_images() -> None:
    """NaN voxels and 4x4-pixel slices are refused with a readable reason."""
    image = np.zeros((4, 16, 16), np.float32)
    image[:, 4:12, 4:12] = 100.0
    image[0, 0, 0] = np.inf
    affine = axial_affine(image.shape, 1.0, 1.0)
    with pytest.raises(PermanentError, match="NaN or inf"):
        ForegroundModel(CPU).predict(Volume(array=image, affine=affine, modality="OT"))
    with pytest.raises(PermanentError, match="at least 8x8 pixels, got 4x4"):
        ForegroundModel(CPU).predict(Volume(array=image[:, :4, :4], affine=affine, modality="OT"))
