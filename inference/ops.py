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
three 1D dilations, each done in ``2r`` shifted in-place ORs (or, for a radius over 8, in
``log2(2r + 1)`` ORs of doubling windows).  Dilation treats the outside of the volume as
background, erosion as foreground (like scikit-image), so closing never eats a structure that
leaves the field of view and opening never grows one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

Offset = tuple[int, int, int]

#: Voxels per slab of the steps done slab by slab (or, for painting, per step) so that their
#: temporaries stay a small fixed size however large the volume: 4 Mi voxels, 32 MiB as int64.
_SLAB_VOXELS = 1 << 22


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
    """Linear index of the first voxel and length of every run, in raster order.

    Slab by slab, so the padded copy and its differences stay small on a large volume.
    """
    d, h, w = mask.shape
    step = max(1, _SLAB_VOXELS // max(1, h * w))
    firsts: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    for z in range(0, d, step):
        slab = mask[z : z + step]
        edge = torch.zeros((slab.shape[0], h, 1), dtype=torch.bool, device=mask.device)
        padded = torch.cat([edge, slab, edge], dim=2)
        # Every row starts and ends with background, so its changes alternate start, stop, ...
        changes = torch.nonzero((padded[..., 1:] != padded[..., :-1]).view(-1)).view(-1)
        starts, stops = changes[0::2], changes[1::2]
        row = starts // (w + 1)
        firsts.append(z * h * w + row * w + starts % (w + 1))
        lengths.append(stops - starts)
    if len(firsts) == 1:
        return firsts[0], lengths[0]
    return torch.cat(firsts), torch.cat(lengths)


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


def _paint(runs: _Runs, per_run: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """Volume holding ``per_run[i]`` on the voxels of run ``i`` and zero/False elsewhere (or
    ``into``'s own values there, painted over in place).

    Only the runs with a non-zero value are written, a bounded number of voxels at a time:
    ``repeat_interleave`` over every voxel at once would make an int64 index of 8 bytes a voxel.
    """
    if into is None:
        into = torch.zeros(runs.shape, dtype=per_run.dtype, device=runs.start.device)
    flat = into.view(-1)
    chosen = per_run if per_run.dtype == torch.bool else per_run != 0
    start, length, value = runs.start[chosen], runs.length[chosen], per_run[chosen]
    if start.numel() == 0:
        return into
    ends = torch.cumsum(length, 0)  # voxels written up to and including each run
    # Runs are at most one row long, so cutting at multiples of the step gives even steps.
    total = int(ends[-1])
    step = _SLAB_VOXELS
    marks = torch.arange(step, max(total, step), step, device=ends.device)
    cuts = [0, *torch.searchsorted(ends, marks, side="right").tolist(), int(ends.numel())]
    for lo, hi in itertools.pairwise(cuts):
        if lo == hi:
            continue
        count = length[lo:hi]
        first = ends[lo:hi] - count  # position of each run's first voxel among those written
        n = int(ends[hi - 1] - first[0])
        # Voxel k of this step lies in run i at linear index start[i] + (k - first[i] + first[0]).
        index = torch.repeat_interleave(start[lo:hi] - first + first[0], count, output_size=n)
        index += torch.arange(n, device=index.device)
        if per_run.dtype == torch.bool:
            flat.index_fill_(0, index, True)
        else:
            flat.index_copy_(0, index, torch.repeat_interleave(value[lo:hi], count, output_size=n))
    return into


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
    return _paint(runs, runs.component), runs.n


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
    return _paint(runs, runs.component == biggest)


def remove_small_components(
    mask: torch.Tensor, min_voxels: int, connectivity: int = 26, *, min_fraction: float = 0.0
) -> torch.Tensor:
    """``mask`` without the connected components of fewer than ``min_voxels`` voxels, nor of
    fewer than ``min_fraction`` times the voxels of the largest component.

    Works on the runs of ``mask`` and paints a boolean result, so no per-voxel label volume
    (8 bytes a voxel with :func:`connected_components`) is ever made.
    """
    _check_connectivity(connectivity)
    if not math.isfinite(min_fraction) or not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be between 0 and 1, got {min_fraction}")
    mask = _check_3d(mask)
    runs = _components(mask, _row_links(connectivity))
    sizes = _component_sizes(runs)
    threshold = min_voxels
    if min_fraction > 0.0 and runs.n > 0:
        threshold = max(threshold, math.ceil(min_fraction * int(sizes.max())))
    keep = sizes >= threshold
    return _paint(runs, keep[runs.component])


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
    return _paint(runs, touched[runs.component])


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
    del background  # the runs are all the holes need; paint them into a copy of the mask
    return _paint(runs, ~reaches_border[runs.component], into=mask.clone())


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
    """Dilate by an ellipsoid (or a box) with per-axis ``radius`` in voxels (0 = not along it).

    Always returns a new tensor, which the caller may change in place.
    """
    mask = _check_3d(mask)
    boxes = structuring_boxes(_check_radius(radius), box)
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


def binary_erosion(
    mask: torch.Tensor, radius: tuple[int, int, int], *, box: bool = False
) -> torch.Tensor:
    """Erode by an ellipsoid (or a box); the outside of the volume counts as foreground."""
    return binary_dilation(~_check_3d(mask), radius, box=box).logical_not_()


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


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean, accumulated in float64, of ``values`` where the same-shaped ``mask`` is true.

    Computed slab by slab along the first axis, so the temporaries stay small (``values[mask]``
    on the whole volume makes an index of 8 bytes per selected voxel and ``.to(float64)`` a copy
    of twice the selection); NaN for an empty mask.
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
        # Flat indexing: twice as fast as a 3D boolean index, which first lists 3 coordinates.
        slab = slice(start, start + step)
        selected = values[slab].reshape(-1)[mask[slab].reshape(-1)]
        total += selected.to(torch.float64).sum()
        count += int(selected.numel())
    return float(total) / count if count else math.nan


def radius_in_voxels(mm: float, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Per-axis radius in voxels (rounded) of a distance in mm for ``spacing`` (slice, row, col)."""
    if not math.isfinite(mm) or mm < 0:
        raise ValueError(f"radius must be a finite non-negative number of mm, got {mm}")
    if len(spacing) != 3 or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers of mm, got {spacing}")
    rz, ry, rx = (round(mm / s) for s in spacing)
    return (rz, ry, rx)
