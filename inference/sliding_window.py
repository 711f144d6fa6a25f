"""Patch-wise inference over a volume with overlapping windows and weighted blending.

A network trained on patches sees the volume one patch at a time; overlapping patches are
blended with a Gaussian importance map (centre of a patch weighs more than its edges, where the
network saw less context) or uniformly.  Volumes smaller than a patch are padded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F

Blend = Literal["gaussian", "uniform"]
PatchFn = Callable[[torch.Tensor], torch.Tensor]


def _starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts covering ``[0, size)`` with the last window flush with the end."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def importance_map(
    patch_size: Sequence[int], blend: Blend, device: torch.device, sigma_scale: float = 0.125
) -> torch.Tensor:
    """Weights of one patch: a Gaussian (sigma = ``sigma_scale`` x patch size) or ones."""
    if blend == "uniform":
        return torch.ones(tuple(patch_size), device=device)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'uniform', got {blend!r}")
    weights = torch.ones((), device=device)
    for n in patch_size:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        g = torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-3)) ** 2)
        weights = weights[..., None] * g
    weights = weights / weights.max()
    # The patch's corners get a tiny weight, not zero, so a voxel covered only by corners is
    # still defined.
    return weights.clamp(min=1e-3)


def _autocast(device: torch.device, amp: bool) -> AbstractContextManager[object]:
    # Mixed precision only pays (and is only well supported) on CUDA.
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def sliding_window_inference(
    volume_tensor: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float,
    fn: PatchFn,
    device: torch.device,
    amp: bool = False,
    *,
    blend: Blend = "gaussian",
    pad_value: float | None = None,
) -> torch.Tensor:
    """Run ``fn`` over overlapping patches of a volume and blend the outputs.

    Parameters
    ----------
    volume_tensor:
        ``(slices, rows, columns)`` or ``(channels, slices, rows, columns)``, on any device.
    patch_size:
        Patch ``(slices, rows, columns)`` in voxels.
    overlap:
        Fraction of a patch shared with its neighbour along each axis, in ``[0, 1)``.
    fn:
        Maps a batch ``(1, channels, *patch_size)`` on ``device`` to ``(1, classes, *patch_size)``.
    device:
        Where ``fn`` runs; patches move there one at a time, the blended output stays on the
        device of ``volume_tensor``.
    amp:
        Run ``fn`` under ``torch.autocast`` (float16), on CUDA only; ignored elsewhere.
    blend:
        ``"gaussian"`` or ``"uniform"`` weighting of overlapping patches.
    pad_value:
        Value used to pad a volume smaller than the patch; default the volume's minimum.

    Returns
    -------
    torch.Tensor
        ``(classes, slices, rows, columns)`` float32 on the device of ``volume_tensor``.
    """
    image = volume_tensor[None] if volume_tensor.dim() == 3 else volume_tensor
    if image.dim() != 4:
        raise ValueError(
            f"volume must be 3D or 4D (channels first), got shape {tuple(volume_tensor.shape)}"
        )
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be three positive integers, got {tuple(patch_size)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial = tuple(int(s) for s in image.shape[1:])
    # Pad up to one patch where the volume is smaller (at the far end, so indices do not move).
    padded_shape = tuple(max(s, p) for s, p in zip(spatial, patch, strict=True))
    if padded_shape != spatial:
        fill = float(image.min()) if pad_value is None else pad_value
        pad: list[int] = []
        for s, p in reversed(list(zip(spatial, padded_shape, strict=True))):
            pad += [0, p - s]
        image = F.pad(image, pad, value=fill)

    strides = [max(1, round(p * (1.0 - overlap))) for p in patch]
    weights = importance_map(patch, blend, image.device)
    out: torch.Tensor | None = None
    norm = torch.zeros(padded_shape, dtype=torch.float32, device=image.device)
    grids = [_starts(s, p, st) for s, p, st in zip(padded_shape, patch, strides, strict=True)]
    with torch.no_grad(), _autocast(device, amp):
        for z, y, x in itertools.product(*grids):
            window = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
            batch = image[(slice(None), *window)][None].to(device)
            result = fn(batch)
            if result.dim() != 5 or tuple(result.shape[2:]) != patch or result.shape[0] != 1:
                raise ValueError(
                    f"model output must be (1, classes, {', '.join(map(str, patch))}),"
                    f" got {tuple(result.shape)}"
                )
            result = result[0].float().to(image.device)
            if out is None:
                out = torch.zeros(
                    (result.shape[0], *padded_shape), dtype=torch.float32, device=image.device
                )
            out[(slice(None), *window)] += result * weights
            norm[window] += weights
    assert out is not None  # at least one window always runs
    out = out / norm
    return out[:, : spatial[0], : spatial[1], : spatial[2]].contiguous()
