"""Mask operations on 3D torch tensors ``(slices, rows, columns)`` that the models need and
MONAI has no call for.

The models call MONAI (largest connected component) and scikit-image (Otsu's threshold)
directly.  Here:

- **component filters** (by size, by seed) and **per-slice hole filling**:
  ``scipy.ndimage.label`` plus a few numpy lines.  scipy works on numpy arrays, so **these run
  on the CPU**: a CUDA tensor is copied to the host and the result back to its device.
- **morphology by an ellipsoid** with a per-axis radius in voxels: hand-written torch, on the
  mask's device (GPU included), because scipy's dilation and closing with the same footprint
  were 2-3.5x slower on a 300 x 512 x 512 CT (``benchmarks/ops.py``, docs/performance.md).
  A centred box is inside the ellipsoid when its corner is, so the ellipsoid is the union of
  the boxes spanned by its maximal corners; dilation by a union is the union of the dilations,
  and dilation by a box is three 1D dilations, each done in ``2r`` shifted in-place ORs (or,
  for a radius over 8, in ``log2(2r + 1)`` ORs of doubling windows).  Dilation treats the
  outside of the volume as background, erosion as foreground (scipy's ``border_value=1``), so
  closing never eats a structure that leaves the field of view.
- :func:`masked_mean`: torch, slab by slab, to bound its temporaries.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.ndimage as ndi
import torch

Radius = tuple[int, int, int]

#: Voxels per slab of the steps done slab by slab, so that their temporaries stay a small fixed
#: size however large the volume: 4 Mi voxels.
_SLAB_VOXELS = 1 << 22

#: scipy's connectivity rank (orthogonal hops) of each neighbourhood size.
_RANK = {6: 1, 18: 2, 26: 3}


def _host(mask: torch.Tensor, what: str = "mask") -> np.ndarray:
    """``mask`` as a boolean numpy array (a copy when it lives on a GPU; CPU from here on)."""
    array: np.ndarray = _check_3d(mask, what).cpu().numpy()
    return array


def _check_3d(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """``mask`` as a contiguous boolean tensor on its own device."""
    if mask.dim() != 3:
        raise ValueError(
            f"{what} must be 3D (slices, rows, columns), got shape {tuple(mask.shape)}"
        )
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()


def _back(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(like.device)


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in _RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure: np.ndarray = ndi.generate_binary_structure(3, _RANK[connectivity])
    return structure


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``table[labels]`` slab by slab: indexing with the whole int32 label volume at once first
    makes an int64 copy of it (8 bytes a voxel, 630 MiB for 300 x 512 x 512)."""
    out = np.empty(labels.shape, dtype=table.dtype)
    step = max(1, _SLAB_VOXELS // max(1, labels[0].size))
    for z in range(0, labels.shape[0], step):
        out[z : z + step] = table[labels[z : z + step]]
    return out


def remove_small_components(
    mask: torch.Tensor, min_voxels: int, connectivity: int = 26, *, min_fraction: float = 0.0
) -> torch.Tensor:
    """``mask`` without the connected components of fewer than ``min_voxels`` voxels, nor of
    fewer than ``min_fraction`` times the voxels of the largest component (CPU)."""
    structure = _structure(connectivity)
    if not math.isfinite(min_fraction) or not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be between 0 and 1, got {min_fraction}")
    # int32 labels (4 bytes a voxel) live only inside this call.
    labels, n = ndi.label(_host(mask), structure=structure)
    sizes = np.zeros(n + 1, dtype=np.int64)
    step = max(1, _SLAB_VOXELS // max(1, labels[0].size))
    for z in range(0, labels.shape[0], step):  # bincount copies its input to int64: slab by slab
        sizes += np.bincount(labels[z : z + step].reshape(-1), minlength=n + 1)
    sizes[0] = 0
    threshold = min_voxels
    if min_fraction > 0.0 and n > 0:
        threshold = max(threshold, math.ceil(min_fraction * int(sizes.max())))
    keep = sizes >= max(threshold, 1)
    return _back(_lookup(keep, labels), mask)


def components_touching(
    mask: torch.Tensor, seeds: torch.Tensor, connectivity: int = 26
) -> torch.Tensor:
    """The connected components of ``mask`` that contain at least one voxel of ``seeds`` (CPU)."""
    labels, n = ndi.label(_host(mask), structure=_structure(connectivity))
    touched = np.zeros(n + 1, dtype=bool)
    seeded = _host(seeds, "seeds")
    step = max(1, _SLAB_VOXELS // max(1, labels[0].size))
    for z in range(0, labels.shape[0], step):  # slab by slab, as in _lookup
        touched[labels[z : z + step][seeded[z : z + step]]] = True
    touched[0] = False
    return _back(_lookup(touched, labels), mask)


def fill_holes_per_slice(mask: torch.Tensor) -> torch.Tensor:
    """Fill every axial slice's holes in 2D: background regions (4-connected in the slice)
    that do not reach the slice's edges, which fills the lungs inside a body even where they
    leave the field of view in z (CPU).

    One ``scipy.ndimage.label`` of the background with an in-plane structure labels all slices
    at once: faster than ``ndi.binary_fill_holes`` slice by slice, same result
    (``benchmarks/ops.py``).
    """
    array = _host(mask)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndi.generate_binary_structure(2, 1)
    labels, n = ndi.label(~array, structure=in_plane)
    open_to_edge = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        open_to_edge[edge] = True
    open_to_edge[0] = False  # label 0 is the mask itself: kept
    return _back(_lookup(~open_to_edge, labels), mask)


#: Up to this radius a 1D dilation ORs shifted copies into one new tensor (2r in-place ORs);
#: above it, doubling windows (log2(2r + 1) ORs, each allocating) take fewer passes.
_SHIFT_MAX_RADIUS = 8


def _dilate_axis(mask: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """OR of ``mask`` over ``[-radius, radius]`` along ``axis`` (outside = background).

    Returns ``mask`` itself for radius 0, otherwise a new tensor.
    """
    if radius == 0:
        return mask
    if radius <= _SHIFT_MAX_RADIUS:
        out = mask.clone()
        n = mask.shape[axis]
        for shift in range(1, min(radius, n - 1) + 1):
            out.narrow(axis, shift, n - shift).logical_or_(mask.narrow(axis, 0, n - shift))
            out.narrow(axis, 0, n - shift).logical_or_(mask.narrow(axis, shift, n - shift))
        return out
    pad_shape = list(mask.shape)
    pad_shape[axis] = radius
    pad = torch.zeros(pad_shape, dtype=torch.bool, device=mask.device)
    acc = torch.cat([pad, mask, pad], dim=axis)
    window, width = 1, 2 * radius + 1
    # acc[i] holds the OR over a window of `window` voxels; doubling it costs log2(width) steps.
    while window < width:
        step = min(window, width - window)
        length = acc.shape[axis] - step
        acc = acc.narrow(axis, 0, length) | acc.narrow(axis, step, length)
        window += step
    return acc


def _inside_ellipsoid(point: Radius, radius: Radius) -> bool:
    total = Fraction(0)
    for p, r in zip(point, radius, strict=True):
        if r == 0:
            if p != 0:
                return False
        else:
            total += Fraction(p, r) ** 2
    return total <= 1


def structuring_boxes(radius: Radius) -> list[Radius]:
    """Half-sizes of the centred boxes whose union is the ellipsoid of ``radius``."""
    rz, ry, rx = radius
    corners: list[Radius] = []
    for a in range(rz + 1):
        for b in range(ry + 1):
            if not _inside_ellipsoid((a, b, 0), radius):
                continue
            c = rx
            while not _inside_ellipsoid((a, b, c), radius):
                c -= 1
            corners.append((a, b, c))
    return [
        p
        for p in corners
        if not any(q != p and all(qi >= pi for qi, pi in zip(q, p, strict=True)) for q in corners)
    ]


def _check_radius(radius: tuple[int, int, int]) -> Radius:
    if len(radius) != 3 or any(int(r) != r or r < 0 for r in radius):
        raise ValueError(
            f"radius must be three non-negative integers (slice, row, column), got {radius}"
        )
    return (int(radius[0]), int(radius[1]), int(radius[2]))


def binary_dilation(mask: torch.Tensor, radius: Radius) -> torch.Tensor:
    """Dilate by the :func:`ellipsoid` of ``radius`` on the mask's device (GPU included);
    outside the volume is background.  Always returns a new tensor, which the caller may
    change in place."""
    mask = _check_3d(mask)
    boxes = structuring_boxes(_check_radius(radius))
    out: torch.Tensor | None = None
    for a in sorted({b[0] for b in boxes}):
        along_z = _dilate_axis(mask, 0, a)
        for _, b, c in (p for p in boxes if p[0] == a):
            part = _dilate_axis(_dilate_axis(along_z, 1, b), 2, c)
            if out is None:
                # Accumulated in place below, so it must not be the input nor along_z.
                out = part.clone() if part is mask or part is along_z else part
            else:
                out.logical_or_(part)
            del part
    assert out is not None  # structuring_boxes always returns at least the centre
    return out


def binary_erosion(mask: torch.Tensor, radius: Radius) -> torch.Tensor:
    """Erode by the :func:`ellipsoid` of ``radius`` on the mask's device; the outside of the
    volume counts as foreground, so a structure leaving the field of view is not eaten from
    that side (``ndi.binary_erosion`` with ``border_value=1``)."""
    return binary_dilation(~_check_3d(mask), radius).logical_not_()


def binary_closing(mask: torch.Tensor, radius: Radius) -> torch.Tensor:
    """Dilation then erosion by the :func:`ellipsoid` of ``radius``: closes gaps narrower than
    it and keeps structures that leave the volume (unlike ``ndi.binary_closing``, whose
    erosion counts the outside as background)."""
    return binary_erosion(binary_dilation(mask, radius), radius)


def ellipsoid(radius: Radius) -> np.ndarray:
    """Boolean structuring element ``(2rz+1, 2ry+1, 2rx+1)``: the voxels whose offset ``p``
    from the centre has ``sum((p / r) ** 2) <= 1`` (exactly; an axis of radius 0 is flat)."""
    rz, ry, rx = _check_radius(radius)
    element = np.zeros((2 * rz + 1, 2 * ry + 1, 2 * rx + 1), dtype=bool)
    for a in range(-rz, rz + 1):
        for b in range(-ry, ry + 1):
            for c in range(-rx, rx + 1):
                element[a + rz, b + ry, c + rx] = _inside_ellipsoid((a, b, c), (rz, ry, rx))
    return element


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean, accumulated in float64, of ``values`` where the same-shaped ``mask`` is true, on
    their device; NaN for an empty mask.

    Slab by slab along the first axis: ``values[mask].double().mean()`` on the whole volume
    copies the selection twice (float32, then float64: 12 bytes per selected voxel, 1.2 GiB for
    a body of 100 M voxels) where this needs 12 bytes per voxel of one slab
    (``benchmarks/ops.py``).
    """
    if values.shape != mask.shape or values.dim() == 0:
        raise ValueError(
            f"values and mask must have the same shape of at least one axis, got "
            f"{tuple(values.shape)} and {tuple(mask.shape)}"
        )
    mask = mask if mask.dtype == torch.bool else mask != 0
    step = max(1, _SLAB_VOXELS // max(1, values[0].numel()))
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    count = 0
    for start in range(0, values.shape[0], step):
        slab = slice(start, start + step)
        selected = values[slab].reshape(-1)[mask[slab].reshape(-1)]
        total += selected.to(torch.float64).sum()
        count += int(selected.numel())
    return float(total) / count if count else math.nan


def radius_in_voxels(mm: float, spacing: tuple[float, float, float]) -> Radius:
    """Per-axis radius in voxels (rounded) of a distance in mm for ``spacing`` (slice, row, col)."""
    if not math.isfinite(mm) or mm < 0:
        raise ValueError(f"radius must be a finite non-negative number of mm, got {mm}")
    if len(spacing) != 3 or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers of mm, got {spacing}")
    rz, ry, rx = (round(mm / s) for s in spacing)
    return (rz, ry, rx)
