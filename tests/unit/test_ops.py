"""inference.ops: the footprint, borders, size and seed filters it adds to scipy.ndimage."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from inference import ops


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _ellipsoid(radius: tuple[int, int, int]) -> np.ndarray:
    """Reference footprint: offsets with sum((offset / radius) ** 2) <= 1, radius 0 = flat."""
    grids = np.mgrid[tuple(slice(-r, r + 1) for r in radius)]
    inside = np.ones(grids[0].shape, dtype=bool)
    total = np.zeros(grids[0].shape)
    for g, r in zip(grids, radius, strict=True):
        if r == 0:
            inside &= g == 0
        else:
            total += (g / r) ** 2
    return inside & (total <= 1 + 1e-12)


def _random_mask(seed: int, shape: tuple[int, int, int], density: float) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


def test_connectivity_hand_made() -> None:
    """Diagonal neighbours join at 26-connectivity (corner), 18 (edge) or neither (6)."""
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[0, 0, 0] = True
    mask[1, 1, 1] = True  # corner neighbour of (0, 0, 0)
    mask[0, 3, 4] = True
    mask[1, 3, 3] = True  # edge neighbour of (0, 3, 4)
    seeds = np.zeros_like(mask)
    seeds[0, 0, 0] = seeds[0, 3, 4] = True
    touched = {c: ops.components_touching(_t(mask), _t(seeds), c).numpy() for c in (6, 18, 26)}
    assert touched[26][1, 1, 1] and touched[26][1, 3, 3]
    assert not touched[18][1, 1, 1] and touched[18][1, 3, 3]
    assert not touched[6][1, 1, 1] and not touched[6][1, 3, 3]
    assert touched[6][0, 0, 0] and touched[6][0, 3, 4]
    # Sizes follow the same neighbourhoods: at 26 both pairs have 2 voxels, at 6 none has.
    assert int(ops.remove_small_components(_t(mask), 2, 26).sum()) == 4
    assert int(ops.remove_small_components(_t(mask), 2, 18).sum()) == 2
    assert int(ops.remove_small_components(_t(mask), 2, 6).sum()) == 0


def test_filters_on_empty_and_full_masks() -> None:
    """An empty mask stays empty; a full one is one component, kept whole."""
    empty = torch.zeros((3, 4, 5), dtype=torch.bool)
    full = torch.ones((3, 4, 5), dtype=torch.bool)
    assert not ops.remove_small_components(empty, 1).any()
    assert not ops.components_touching(full, empty).any()
    assert bool(ops.remove_small_components(full, 60).all())
    assert not ops.remove_small_components(full, 61).any()
    seed = empty.clone()
    seed[2, 3, 4] = True
    assert bool(ops.components_touching(full, seed).all())


def test_filters_reject_bad_arguments() -> None:
    """A 2D mask or an unknown connectivity is refused with the value in the message."""
    with pytest.raises(ValueError, match=r"must be 3D .* got shape \(4, 5\)"):
        ops.remove_small_components(torch.zeros((4, 5), dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="connectivity must be 6, 18 or 26, got 8"):
        ops.components_touching(torch.zeros((2, 4, 5), dtype=torch.bool), torch.zeros((2, 4, 5), dtype=torch.bool), 8)


def test_remove_small_components_and_components_touching() -> None:
    """Small components are dropped; components containing a seed voxel are kept whole."""
    mask = _random_mask(11, (10, 18, 18), 0.3)
    expected_labels, _ = ndi.label(mask, np.ones((3, 3, 3)))
    sizes = np.bincount(expected_labels.ravel())
    kept = ops.remove_small_components(_t(mask), 5).numpy()
    np.testing.assert_array_equal(kept, mask & (sizes[expected_labels] >= 5))
    seeds = np.zeros_like(mask)
    seeds[:, 0, :] = True  # every component reaching the first row
    touching = ops.components_touching(_t(mask), _t(seeds)).numpy()
    hit = np.unique(expected_labels[seeds & mask])
    np.testing.assert_array_equal(touching, np.isin(expected_labels, hit[hit > 0]))


def test_fill_holes_hand_made() -> None:
    """A tube's inside is filled in every slice, the first and last included, though it is
    open at both ends in 3D; a notch open to the slice's edge is not a hole."""
    mask = np.zeros((3, 7, 7), dtype=bool)
    mask[:, 1:6, 1:6] = True
    mask[:, 2:5, 2:5] = False  # a tube along z: a hole in each slice, open at both ends in 3D
    filled2d = ops.fill_holes_per_slice(_t(mask)).numpy()
    assert filled2d[:, 1:6, 1:6].all() and filled2d.sum() == 3 * 25
    notched = np.ones((2, 5, 5), dtype=bool)
    notched[:, 0:3, 2] = False  # reaches row 0: background touching the border
    np.testing.assert_array_equal(ops.fill_holes_per_slice(_t(notched)).numpy(), notched)
    # Background is 4-connected in the slice: a diagonal gap does not open a hole.
    ring = np.zeros((1, 5, 5), dtype=bool)
    ring[0, 1:4, 1:4] = True
    ring[0, 2, 2] = False
    ring[0, 1, 1] = False  # corner gap: diagonal contact only with the outside
    assert ops.fill_holes_per_slice(_t(ring)).numpy()[0, 2, 2]


@pytest.mark.parametrize("radius", [(0, 0, 0), (1, 1, 1), (0, 3, 3), (1, 2, 3), (2, 0, 1), (3, 3, 3), (1, 6, 6)])
def test_morphology_matches_scipy_ellipsoid(radius: tuple[int, int, int]) -> None:
    """The footprint is the ellipsoid of the radius; erosion counts the outside as foreground,
    and closing is dilation then that erosion."""
    np.testing.assert_array_equal(ops.ellipsoid(radius), _ellipsoid(radius))
    mask = _random_mask(sum(radius), (11, 24, 27), 0.08)
    dense = ndi.binary_dilation(mask, np.ones((1, 3, 3)))
    se = _ellipsoid(radius)
    np.testing.assert_array_equal(ops.binary_dilation(_t(mask), radius).numpy(), ndi.binary_dilation(mask, se))
    # Outside the volume counts as foreground for erosion (scipy: border_value=1).
    np.testing.assert_array_equal(
        ops.binary_erosion(_t(dense), radius).numpy(), ndi.binary_erosion(dense, se, border_value=1)
    )
    expected_closing = ndi.binary_erosion(ndi.binary_dilation(mask, se), se, border_value=1)
    np.testing.assert_array_equal(ops.binary_closing(_t(mask), radius).numpy(), expected_closing)


def test_ellipsoid_structuring_element_hand_made() -> None:
    """Radius (0, 1, 1) is the in-plane cross, (1, 1, 1) the 6-neighbourhood."""
    mask = torch.zeros((5, 5, 5), dtype=torch.bool)
    mask[2, 2, 2] = True
    cross = ops.binary_dilation(mask, (0, 1, 1))
    assert int(cross.sum()) == 5 and not cross[1].any() and not cross[3].any()
    assert int(ops.binary_dilation(mask, (1, 1, 1)).sum()) == 7
    assert int(ops.binary_dilation(mask, (0, 2, 2)).sum()) == 13  # the disk of radius 2


def test_closing_keeps_structures_leaving_the_volume() -> None:
    """Closing never erodes a mask where it reaches the edge of the volume."""
    mask = torch.ones((4, 10, 10), dtype=torch.bool)
    assert bool(ops.binary_closing(mask, (2, 2, 2)).all())
    assert bool(ops.binary_erosion(mask, (2, 2, 2)).all())


def test_morphology_rejects_bad_radius() -> None:
    """A negative or fractional radius is refused with the value in the message."""
    with pytest.raises(ValueError, match=r"radius must be three non-negative integers .* got \(1, -1, 0\)"):
        ops.binary_dilation(torch.zeros((2, 3, 4), dtype=torch.bool), (1, -1, 0))


def test_radius_in_voxels() -> None:
    """A distance in mm becomes the nearest whole number of voxels along each axis."""
    assert ops.radius_in_voxels(5.0, (5.0, 0.7, 0.7)) == (1, 7, 7)
    assert ops.radius_in_voxels(3.0, (5.0, 3.5, 3.5)) == (1, 1, 1)
    assert ops.radius_in_voxels(0.0, (1.0, 1.0, 1.0)) == (0, 0, 0)
    with pytest.raises(ValueError, match="got -1"):
        ops.radius_in_voxels(-1.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be three positive"):
        ops.radius_in_voxels(1.0, (1.0, 0.0, 1.0))


def test_ops_accept_non_bool_masks() -> None:
    """A uint8 mask is read as non-zero = foreground."""
    mask = np.zeros((2, 5, 5), dtype=np.uint8)
    mask[0, 1:3, 1:3] = 7
    kept = ops.remove_small_components(_t(mask), 4).numpy()
    assert kept.dtype == np.bool_ and int(kept.sum()) == 4
    assert int(ops.binary_dilation(_t(mask), (0, 1, 1)).sum()) == 12


@pytest.mark.parametrize("slab_voxels", [1, 37, 600])
def test_slab_by_slab_steps(monkeypatch: pytest.MonkeyPatch, slab_voxels: int) -> None:
    """With slabs far smaller than the volume (one voxel, part of a row, several rows) the
    label look-ups give the same masks and the mean still equals numpy's on the whole volume."""
    mask = _random_mask(slab_voxels, (7, 19, 23), 0.45)
    seeds = _random_mask(slab_voxels + 1, mask.shape, 0.01)
    whole = (
        ops.remove_small_components(_t(mask), 4).numpy(),
        ops.components_touching(_t(mask), _t(seeds)).numpy(),
        ops.fill_holes_per_slice(_t(mask)).numpy(),
    )
    monkeypatch.setattr(ops, "_SLAB_VOXELS", slab_voxels)
    np.testing.assert_array_equal(ops.remove_small_components(_t(mask), 4).numpy(), whole[0])
    np.testing.assert_array_equal(ops.components_touching(_t(mask), _t(seeds)).numpy(), whole[1])
    np.testing.assert_array_equal(ops.fill_holes_per_slice(_t(mask)).numpy(), whole[2])
    values = np.random.default_rng(slab_voxels).normal(40.0, 300.0, mask.shape).astype(np.float32)
    assert ops.masked_mean(_t(values), _t(mask)) == pytest.approx(
        float(values[mask].astype(np.float64).mean()), rel=1e-9
    )


def test_remove_small_components_min_fraction() -> None:
    """``min_fraction`` also drops components under that share of the largest one's voxels."""
    mask = np.zeros((1, 12, 40), dtype=bool)
    mask[0, 1, 0:20] = True  # 20 voxels: the largest
    mask[0, 4, 0:10] = True  # 10 voxels: half of it
    mask[0, 7, 0:9] = True  # 9 voxels: under half
    mask[0, 10, 0:2] = True  # 2 voxels: under min_voxels as well
    kept = ops.remove_small_components(_t(mask), 1, min_fraction=0.5).numpy()
    np.testing.assert_array_equal(kept.sum(axis=2)[0], [0, 20, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0])
    # min_voxels still applies when it is the stricter bound.
    assert int(ops.remove_small_components(_t(mask), 15, min_fraction=0.1).sum()) == 20
    assert not ops.remove_small_components(torch.zeros((2, 3, 4), dtype=torch.bool), 1, min_fraction=0.5).any()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_fraction must be between 0 and 1"):
            ops.remove_small_components(_t(mask), 1, min_fraction=bad)


def test_masked_mean() -> None:
    """The float64 mean of the selected values; NaN when nothing is selected; shapes checked."""
    values = torch.tensor([[[1, 2], [3, 30000]], [[-32768, 5], [6, 7]]], dtype=torch.int16)
    mask = values > 2
    assert ops.masked_mean(values, mask) == pytest.approx((3 + 30000 + 5 + 6 + 7) / 5)
    assert np.isnan(ops.masked_mean(values, torch.zeros_like(mask)))
    assert ops.masked_mean(values, mask.to(torch.uint8)) == ops.masked_mean(values, mask)
    with pytest.raises(ValueError, match=r"same shape .* got \(2, 2, 2\) and \(2, 2\)"):
        ops.masked_mean(values, mask[0])
