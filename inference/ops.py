"""Binary image operations on 3D torch tensors ``(slices, rows, columns)``, on any device.

Every function works on the device of its input tensor (CPU in tests, CUDA in production) and
uses only whole-tensor torch operations, so nothing here loops over voxels in Python.

Connected components label runs of foreground voxels along the column axis, link runs that touch
in neighbouring rows/slices, and merge the links with a vectorised union-find (hook the larger
root onto the smaller one with ``scatter_reduce``, then pointer-jump until every run points at
its root).  Pointer jumping shortens any chain of links in a few rounds, where min-label
propagation with ``max_pool3d`` needs one round per voxel along the longest path.  Labels come
out in raster order of each component's first voxel, the same order as ``scipy.ndimage.label``.

Morphology uses an ellipsoid (or a box) with a per-axis radius in voxels.  A centred box is
inside the ellipsoid when its corner is, so the ellipsoid is the union of the boxes spanned by
its maximal corners; dilation by a union is the union of the dilations, and dilation by a box is
three 1D dilations, each done in ``log2(2r + 1)`` shifted ORs.  Dilation treats the outside of
the volume as background, erosion as foreground (like scikit-image), so closing never eats a
structure that leaves the field of view and opening never grows one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

Offset = tuple[int, int, int]


def _row_links(connectivity: int) -> tuple[tuple[int, int, int], ...]:
    """``(d_slice, d_row, column tolerance)`` to the forward rows a run touches."""
    reach = {6: 1, 18: 2, 26: 3}[connectivity]
    return tuple(
        (dz, dy, 1 if dz + abs(dy) + 1 <= reach else 0)
        for dz, dy in ((0, 1), (1, -1), (1, 0), (1, 1))
        if dz + abs(dy) <= reach
    )


#: Background of per-slice hole filling: 4-connected in the slice, as scipy's default.
_SLICE_LINKS_4 = ((0, 1, 0),)


@dataclass
class _Runs:
    """Foreground runs along the columns, in raster order, and the component of each."""

    shape: tuple[int, int, int]
    start: torch.Tensor  # linear index of the first voxel
    length: torch.Tensor
    component: torch.Tensor  # 1..n
    n: int


def _check_3d(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    if mask.dim() != 3:
        raise ValueError(
            f"{what} must be 3D (slices, rows, columns), got shape {tuple(mask.shape)}"
        )
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()


def _run_bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear index of the first voxel and length of every run, in raster order."""
    d, h, w = mask.shape
    edge = torch.zeros((d, h, 1), dtype=torch.bool, device=mask.device)
    padded = torch.cat([edge, mask, edge], dim=2)
    # Every row starts and ends with background, so its changes alternate start, stop, ...
    changes = torch.nonzero((padded[..., 1:] != padded[..., :-1]).view(-1)).view(-1)
    starts, stops = changes[0::2], changes[1::2]
    row = starts // (w + 1)
    return row * w + starts % (w + 1), stops - starts


def _union_find(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root (smallest member) of every node 0..n-1 after joining the pairs ``(a[i], b[i])``."""
    parent = torch.arange(n, device=a.device, dtype=torch.int64)
    while a.numel():
        pa = parent[a]
        pb = parent[b]
        differ = pa != pb
        if not bool(differ.any()):
            break
        a, b, pa, pb = a[differ], b[differ], pa[differ], pb[differ]
        # Hook the larger root under the smaller: parents only ever point downwards, so no cycle.
        parent.scatter_reduce_(0, torch.maximum(pa, pb), torch.minimum(pa, pb), reduce="amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
    return parent


def _components(mask: torch.Tensor, links: tuple[tuple[int, int, int], ...]) -> _Runs:
    """Runs of ``mask`` joined into components through the forward row ``links``."""
    d, h, w = (int(s) for s in mask.shape)
    dev = mask.device
    start, length = _run_bounds(mask)
    n_runs = int(start.numel())
    row = start // w
    first_col = start % w
    last_col = first_col + length - 1
    # Keys sort runs by (row, column) with a gap between rows, so a search never crosses rows.
    stride = w + 2
    start_key = row * stride + first_col
    end_key = row * stride + last_col
    sources: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for dz, dy, tol in links:
        y = row % h + dy
        valid = (y >= 0) & (y < h) & (row // h + dz < d)
        target_row = row + dz * h + dy
        # Runs of the target row overlapping [first_col - tol, last_col + tol] are consecutive.
        first = torch.searchsorted(end_key, target_row * stride + first_col - tol, side="left")
        last = torch.searchsorted(start_key, target_row * stride + last_col + tol, side="right")
        count = torch.where(valid, (last - first).clamp(min=0), 0)
        total = int(count.sum())
        if total == 0:
            continue
        src = torch.repeat_interleave(torch.arange(n_runs, device=dev), count, output_size=total)
        group_start = torch.cumsum(count, 0) - count
        within = torch.arange(total, device=dev) - torch.repeat_interleave(
            group_start, count, output_size=total
        )
        sources.append(src)
        targets.append(torch.repeat_interleave(first, count, output_size=total) + within)
    if sources:
        root = _union_find(n_runs, torch.cat(sources), torch.cat(targets))
    else:
        root = torch.arange(n_runs, device=dev)
    is_root = root == torch.arange(n_runs, device=dev)
    # Roots are each component's lowest run, so numbering roots in order gives raster order.
    component = torch.cumsum(is_root, 0)[root]
    return _Runs((d, h, w), start, length, component, int(is_root.sum()))


def _paint(runs: _Runs, mask: torch.Tensor, per_run: torch.Tensor) -> torch.Tensor:
    """Volume holding ``per_run[i]`` on the voxels of run ``i`` and zero/False elsewhere."""
    total = int(runs.length.sum())
    values = torch.repeat_interleave(per_run, runs.length, output_size=total)
    out = torch.zeros(mask.numel(), dtype=per_run.dtype, device=mask.device)
    return out.masked_scatter_(mask.view(-1), values).view(runs.shape)


def _component_sizes(runs: _Runs) -> torch.Tensor:
    return torch.zeros(runs.n + 1, dtype=torch.int64, device=runs.start.device).index_add_(
        0, runs.component, runs.length
    )


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")


def connected_components(mask: torch.Tensor, connectivity: int = 26) -> tuple[torch.Tensor, int]:
    """Label the connected components of a 3D mask.

    Parameters
    ----------
    mask:
        Boolean tensor ``(slices, rows, columns)`` (other dtypes: non-zero is foreground).
    connectivity:
        6 (faces), 18 (faces and edges) or 26 (faces, edges and corners).

    Returns
    -------
    labels, n:
        int64 labels on the mask's device (0 background, 1..n in raster order of each
        component's first voxel) and the number of components.
    """
    _check_connectivity(connectivity)
    mask = _check_3d(mask)
    runs = _components(mask, _row_links(connectivity))
    return _paint(runs, mask, runs.component), runs.n


def component_sizes(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Voxel count of each label 1..n as an int64 tensor of length ``n``."""
    counts = torch.bincount(labels.reshape(-1).to(torch.int64), minlength=n + 1)
    return counts[1 : n + 1]


def largest_component(mask: torch.Tensor, connectivity: int = 26) -> torch.Tensor:
    """The largest connected component of ``mask`` (the first in raster order on a tie)."""
    _check_connectivity(connectivity)
    mask = _check_3d(mask)
    runs = _components(mask, _row_links(connectivity))
    if runs.n == 0:
        return torch.zeros_like(mask)
    biggest = int(torch.argmax(_component_sizes(runs)[1:])) + 1
    return _paint(runs, mask, runs.component == biggest)


def remove_small_components(
    mask: torch.Tensor, min_voxels: int, connectivity: int = 26
) -> torch.Tensor:
    """``mask`` without the connected components of fewer than ``min_voxels`` voxels."""
    _check_connectivity(connectivity)
    mask = _check_3d(mask)
    runs = _components(mask, _row_links(connectivity))
    keep = _component_sizes(runs) >= min_voxels
    return _paint(runs, mask, keep[runs.component])


def components_touching(
    mask: torch.Tensor, seeds: torch.Tensor, connectivity: int = 26
) -> torch.Tensor:
    """The connected components of ``mask`` that contain at least one voxel of ``seeds``."""
    _check_connectivity(connectivity)
    mask = _check_3d(mask)
    runs = _components(mask, _row_links(connectivity))
    # Each run of (seeds & mask) lies inside one run of mask: find it by its first voxel.
    seed_start, _ = _run_bounds(mask & _check_3d(seeds, "seeds"))
    seeded_run = torch.searchsorted(runs.start, seed_start, side="right") - 1
    touched = torch.zeros(runs.n + 1, dtype=torch.bool, device=mask.device)
    touched[runs.component[seeded_run]] = True
    return _paint(runs, mask, touched[runs.component])


def fill_holes(mask: torch.Tensor, per_slice: bool = True) -> torch.Tensor:
    """Fill background regions that do not reach the border.

    With ``per_slice`` each axial slice is filled in 2D (background 4-connected, border = the
    slice's edges), which fills the lungs inside a body even where they leave the field of view
    in z; otherwise in 3D (background 6-connected, border = all six faces).
    """
    mask = _check_3d(mask)
    d, h, w = mask.shape
    background = ~mask
    runs = _components(background, _SLICE_LINKS_4 if per_slice else _row_links(6))
    row = runs.start // w
    y = row % h
    first_col = runs.start % w
    on_border = (y == 0) | (y == h - 1) | (first_col == 0) | (first_col + runs.length == w)
    if not per_slice:
        z = row // h
        on_border |= (z == 0) | (z == d - 1)
    reaches_border = torch.zeros(runs.n + 1, dtype=torch.bool, device=mask.device)
    reaches_border[runs.component[on_border]] = True
    return mask | _paint(runs, background, ~reaches_border[runs.component])


def _dilate_axis(mask: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """OR of ``mask`` over ``[-radius, radius]`` along ``axis`` (outside = background)."""
    if radius == 0:
        return mask
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


def _inside_ellipsoid(point: Offset, radius: Offset) -> bool:
    total = Fraction(0)
    for p, r in zip(point, radius, strict=True):
        if r == 0:
            if p != 0:
                return False
        else:
            total += Fraction(p, r) ** 2
    return total <= 1


def structuring_boxes(radius: Offset, box: bool = False) -> list[Offset]:
    """Half-sizes of the centred boxes whose union is the ellipsoid (or box) of ``radius``."""
    if box:
        return [radius]
    rz, ry, rx = radius
    corners: list[Offset] = []
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


def _check_radius(radius: tuple[int, int, int]) -> Offset:
    if len(radius) != 3 or any(int(r) != r or r < 0 for r in radius):
        raise ValueError(
            f"radius must be three non-negative integers (slice, row, column), got {radius}"
        )
    return (int(radius[0]), int(radius[1]), int(radius[2]))


def binary_dilation(
    mask: torch.Tensor, radius: tuple[int, int, int], *, box: bool = False
) -> torch.Tensor:
    """Dilate by an ellipsoid (or a box) with per-axis ``radius`` in voxels (0 = not along it)."""
    mask = _check_3d(mask)
    boxes = structuring_boxes(_check_radius(radius), box)
    out: torch.Tensor | None = None
    for a in sorted({b[0] for b in boxes}):
        along_z = _dilate_axis(mask, 0, a)
        for _, b, c in (p for p in boxes if p[0] == a):
            part = _dilate_axis(_dilate_axis(along_z, 1, b), 2, c)
            out = part if out is None else out | part
    assert out is not None  # structuring_boxes always returns at least the centre
    return out


def binary_erosion(
    mask: torch.Tensor, radius: tuple[int, int, int], *, box: bool = False
) -> torch.Tensor:
    """Erode by an ellipsoid (or a box); the outside of the volume counts as foreground."""
    return ~binary_dilation(~_check_3d(mask), radius, box=box)


def binary_closing(
    mask: torch.Tensor, radius: tuple[int, int, int], *, box: bool = False
) -> torch.Tensor:
    """Dilation then erosion: closes gaps narrower than the structuring element."""
    return binary_erosion(binary_dilation(mask, radius, box=box), radius, box=box)


def binary_opening(
    mask: torch.Tensor, radius: tuple[int, int, int], *, box: bool = False
) -> torch.Tensor:
    """Erosion then dilation: removes parts narrower than the structuring element."""
    return binary_dilation(binary_erosion(mask, radius, box=box), radius, box=box)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (non-finite ones ignored): class 1 is ``values > t``.

    Returns the centre of the last histogram bin of the lower class, as scikit-image does.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    v = values.reshape(-1)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.to(torch.float32)
    # One sum is much cheaper than isfinite() on a big volume; filter only when it is needed.
    if not math.isfinite(float(v.sum())):
        v = v[torch.isfinite(v)]
    if v.numel() == 0:
        raise ValueError("otsu_threshold needs finite values, got none")
    lo_t, hi_t = torch.aminmax(v)
    lo, hi = float(lo_t), float(hi_t)
    if hi <= lo:
        raise ValueError(f"otsu_threshold needs at least two distinct values, every value is {lo}")
    hist = torch.histc(v, bins=bins, min=lo, max=hi).to(torch.float64)
    width = (hi - lo) / bins
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=v.device) + 0.5) * width
    weight0 = torch.cumsum(hist, 0)[:-1]
    weight1 = hist.sum() - weight0
    sum0 = torch.cumsum(hist * centres, 0)[:-1]
    sum1 = (hist * centres).sum() - sum0
    between = weight0 * weight1 * (sum0 / weight0 - sum1 / weight1) ** 2
    # An empty class has no mean (0/0 = nan); it can never be the best split.
    between = torch.nan_to_num(between, nan=-1.0)
    return float(centres[int(torch.argmax(between))])


def radius_in_voxels(mm: float, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Per-axis radius in voxels (rounded) of a distance in mm for ``spacing`` (slice, row, col)."""
    if not math.isfinite(mm) or mm < 0:
        raise ValueError(f"radius must be a finite non-negative number of mm, got {mm}")
    if len(spacing) != 3 or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers of mm, got {spacing}")
    rz, ry, rx = (round(mm / s) for s in spacing)
    return (rz, ry, rx)
