"""Sliding-window inference: coverage, blending, padding and argument checks."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import compute_importance_map

from inference.user_models import sliding_window_inference

CPU = torch.device("cpu")


def _identity(batch: torch.Tensor) -> torch.Tensor:
    return batch * 2.0


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_pointwise_network_is_reproduced_exactly(blend: str, overlap: float) -> None:
    """A voxel-wise network gives the whole-volume result whatever the patches and blending."""
    g = torch.Generator().manual_seed(0)
    volume = torch.randn((13, 30, 23), generator=g)
    out = sliding_window_inference(volume, (8, 16, 10), overlap, _identity, CPU, blend=blend)  # type: ignore[arg-type]
    assert out.shape == (1, 13, 30, 23)
    torch.testing.assert_close(out[0], volume * 2.0)


def test_volume_smaller_than_patch_is_padded_and_cropped() -> None:
    """A volume smaller than the patch runs as one padded patch and comes back at its own size."""
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    seen: list[tuple[int, ...]] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape))
        return torch.cat([batch, -batch], dim=1)

    out = sliding_window_inference(volume, (8, 8, 8), 0.5, fn, CPU)
    assert seen == [(1, 1, 8, 8, 8)]
    assert out.shape == (2, 4, 5, 6)
    torch.testing.assert_close(out[1], -volume)


def test_every_voxel_is_covered_and_windows_overlap() -> None:
    """Window starts cover the volume to its last voxel, with the requested overlap."""
    starts: list[tuple[int, int, int]] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(batch)

    volume = torch.zeros((1, 20, 37))
    # Record where patches come from by making each patch's values its own coordinates.
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(n) for n in volume.shape), indexing="ij")
    ).float()

    def where(batch: torch.Tensor) -> torch.Tensor:
        starts.append(tuple(int(batch[0, i].min()) for i in range(3)))  # type: ignore[arg-type]
        return batch[:, :1]

    sliding_window_inference(coords, (1, 10, 10), 0.5, where, CPU)
    rows = sorted({s[1] for s in starts})
    cols = sorted({s[2] for s in starts})
    assert rows == [0, 5, 10]
    assert cols == [0, 5, 10, 15, 20, 25, 27]
    out = sliding_window_inference(volume, (1, 10, 10), 0.5, fn, CPU)
    assert torch.all(out == 1.0)


def test_gaussian_importance_map_peaks_in_the_centre() -> None:
    """MONAI's Gaussian weights are 1 at the patch centre, smaller at the edges but never zero."""
    w = compute_importance_map((9, 9, 9), mode="gaussian", sigma_scale=0.125, device=CPU)
    assert float(w[4, 4, 4]) == pytest.approx(1.0)
    assert float(w[0, 0, 0]) > 0.0
    assert float(w[0, 4, 4]) < float(w[2, 4, 4]) < float(w[4, 4, 4])


def test_amp_is_ignored_on_cpu() -> None:
    """Asking for AMP on a CPU device runs in float32, not bfloat16/float16."""
    dtypes: list[torch.dtype] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv3d(batch, torch.ones(1, 1, 1, 1, 1))
        dtypes.append(y.dtype)
        return y

    sliding_window_inference(torch.ones((4, 4, 4)), (4, 4, 4), 0.0, fn, CPU, amp=True)
    assert dtypes == [torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_amp_uses_float16_on_cuda() -> None:
    """On CUDA with amp the network's convolutions run in float16; output is float32."""
    dtypes: list[torch.dtype] = []
    weight = torch.ones(1, 1, 1, 1, 1, device="cuda")

    def fn(batch: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv3d(batch, weight)
        dtypes.append(y.dtype)
        return y

    out = sliding_window_inference(
        torch.ones((4, 4, 4)), (4, 4, 4), 0.0, fn, torch.device("cuda"), amp=True
    )
    assert dtypes == [torch.float16] and out.dtype == torch.float32


def test_bad_arguments_are_refused() -> None:
    """Overlap outside [0, 1), a bad patch size or a wrong output shape raise a clear ValueError."""
    v = torch.zeros((4, 4, 4))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        sliding_window_inference(v, (2, 2, 2), 1.0, _identity, CPU)
    with pytest.raises(ValueError, match="patch_size must be three positive integers"):
        sliding_window_inference(v, (2, 0, 2), 0.5, _identity, CPU)
    with pytest.raises(ValueError, match=r"model output must be \(1, classes, 2, 2, 2\)"):
        sliding_window_inference(v, (2, 2, 2), 0.5, lambda b: b[:, :, :1], CPU)
