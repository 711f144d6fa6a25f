"""GPU settings of a model run, tested on the CPU: the warm-model LRU cache, per-model devices,
mixed precision, the sliding window's batch size and the peak memory of a run.

Every test that can runs on each device this machine has (``device`` is parametrised; the CUDA
case is skipped without CUDA), and the device *decisions* are tested for CUDA on the CPU too:
they depend only on a ``torch.device``'s type.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.demo import axial_affine
from inference import PermanentError, Volume
from inference.gpu import PeakMemory, amp_dtype, autocast, resolve_device
from inference.registry import ModelRegistry
from inference.user_models import sliding_window_inference
from tests.support.tiny_models import TinyThreshold, tiny_factories

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)
DEVICES = ["cpu", CUDA]


def small_volume() -> Volume:
    array = np.zeros((4, 8, 8), dtype=np.float32)
    array[1:3, 2:6, 2:6] = 100.0
    return Volume(array, axial_affine((4, 8, 8), 1.0, 2.0), "CT")


# -- warm models: the LRU cache ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_cap_of_one_keeps_only_the_last_model(device: str) -> None:
    """With one warm model, each other model evicts it: a, b, a loads three times."""
    created: list[str] = []
    registry = ModelRegistry(torch.device(device), tiny_factories("a", "b", created=created), max_warm=1)
    first = registry.get("a")
    assert [w.name for w in registry.warm()] == ["a"] and registry.is_warm("a")
    registry.get("b")
    assert [w.name for w in registry.warm()] == ["b"] and not registry.is_warm("a")
    again = registry.get("a")
    assert again is not first  # cold again: a new instance
    assert created == ["a", "b", "a"] and registry.evicted == ["a", "b"]


@pytest.mark.parametrize("device", DEVICES)
def test_cap_of_two_evicts_the_least_recently_used(device: str) -> None:
    """a, b, a (a is now the most recent), c: b goes, not a; then b again evicts a."""
    created: list[str] = []
    registry = ModelRegistry(torch.device(device), tiny_factories("a", "b", "c", created=created), max_warm=2)
    model_a = registry.get("a")
    registry.get("b")
    assert registry.get("a") is model_a  # warm: the same instance
    registry.get("c")
    assert [w.name for w in registry.warm()] == ["a", "c"]  # least recently used first
    assert registry.evicted == ["b"]
    registry.get("b")
    assert [w.name for w in registry.warm()] == ["c", "b"]
    assert registry.evicted == ["b", "a"] and created == ["a", "b", "c", "b"]
    uses = {w.name: w.uses for w in registry.warm()}
    assert uses == {"c": 1, "b": 1}
    assert all(w.device == str(torch.device(device)) and w.version == "1.0.0" for w in registry.warm())


@pytest.mark.parametrize("device", DEVICES)
def test_evicted_model_frees_its_memory(device: str) -> None:
    """An evicted model's network is no longer referenced by the registry: it is collected
    (on CUDA its memory leaves ``memory_allocated``)."""
    import weakref

    registry = ModelRegistry(torch.device(device), tiny_factories("a", "b"), max_warm=1)
    model = registry.get("a")
    assert isinstance(model, TinyThreshold)
    ref = weakref.ref(model.network)
    del model
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    registry.get("b")
    assert ref() is None
    if device == "cuda":  # a's weights left; b's (the same size) came
        assert torch.cuda.memory_allocated() <= allocated


def test_warm_model_runs_with_the_same_result() -> None:
    """A warm model is reused across jobs (its prediction count grows), and gives the same mask."""
    registry = ModelRegistry(torch.device("cpu"), tiny_factories("a"), max_warm=1)
    volume = small_volume()
    first = registry.get("a").predict(volume)
    model = registry.get("a")
    second = model.predict(volume)
    assert isinstance(model, TinyThreshold) and model.predictions == 2
    assert np.array_equal(first.segments[0].mask, second.segments[0].mask)
    assert int(first.segments[0].mask.sum()) == 2 * 4 * 4
    assert registry.warm()[0].uses == 2


def test_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_warm must be at least 1"):
        ModelRegistry(torch.device("cpu"), {}, max_warm=0)


# -- devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preference", "cuda_devices", "expected"),
    [("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda"), ("cuda:1", 2, "cuda:1")],
)
def test_device_preferences_resolve(preference: str, cuda_devices: int, expected: str) -> None:
    assert resolve_device(preference, cuda_devices=cuda_devices) == torch.device(expected)


@pytest.mark.parametrize(("preference", "cuda_devices"), [("cuda", 0), ("cuda:1", 1), ("tpu", 1), ("mps", 0)])
def test_missing_or_unknown_device_is_a_permanent_error(preference: str, cuda_devices: int) -> None:
    with pytest.raises(PermanentError, match=repr(preference)):
        resolve_device(preference, cuda_devices=cuda_devices)


def test_a_model_pinned_to_a_device_the_worker_lacks_fails_with_the_reason() -> None:
    """``[[models]] device = "cuda:7"``: the model's job fails with why, the others run."""
    registry = ModelRegistry(torch.device("cpu"), tiny_factories("a", "b"))
    registry.register("b", tiny_factories("b")["b"], device=f"cuda:{torch.cuda.device_count() + 7}")
    assert registry.get("a").predict(small_volume()).segments
    with pytest.raises(PermanentError, match="CUDA device"):
        registry.get("b")
    registry.register("b", tiny_factories("b")["b"], device="cpu")
    assert registry.device_for("b") == torch.device("cpu")


# -- mixed precision -------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "amp", "expected"), [
    ("cuda", True, torch.float16), ("cuda", False, None), ("cpu", True, None), ("cpu", False, None),
])
def test_amp_is_float16_on_cuda_and_off_on_the_cpu(device: str, amp: bool, expected: torch.dtype | None) -> None:
    """The decision, for both device types, on any machine."""
    assert amp_dtype(torch.device(device), amp) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_context_matches_the_decision(device: str) -> None:
    """Under :func:`autocast` a matmul on the device gives float16 on CUDA, float32 on the CPU."""
    dev = torch.device(device)
    x = torch.ones(4, 4, device=dev)
    with autocast(dev, True):
        y = x @ x
    assert y.dtype == (amp_dtype(dev, True) or torch.float32)
    assert float(y[0, 0]) == 4.0


# -- sliding window batch size ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batch_size_reaches_monai_sliding_window(device: str, batch_size: int) -> None:
    """``batch_size`` patches go through the network per call: the call count is the number of
    windows over the batch size, rounded up, and the blended output does not change."""
    dev = torch.device(device)
    volume = torch.arange(12 * 20 * 20, dtype=torch.float32).reshape(12, 20, 20) / 1000.0
    batches: list[int] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        batches.append(int(batch.shape[0]))
        return batch * 2.0

    one = sliding_window_inference(volume, (4, 8, 8), 0.25, lambda b: b * 2.0, dev, blend="uniform")
    out = sliding_window_inference(volume, (4, 8, 8), 0.25, fn, dev, blend="uniform", batch_size=batch_size)
    windows = sum(batches)
    assert windows > 8  # several windows: the batching is visible
    assert len(batches) == math.ceil(windows / batch_size)
    assert max(batches) == min(batch_size, windows)
    assert torch.allclose(out.cpu(), one.cpu()) and torch.allclose(out.cpu(), volume[None] * 2.0, atol=1e-5)


def test_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        sliding_window_inference(torch.zeros(4, 4, 4), (4, 4, 4), 0.0, lambda b: b, torch.device("cpu"), batch_size=0)


# -- peak memory ------------------------------------------------------------------------------


def test_peak_memory_on_the_cpu_is_the_resident_growth_of_the_run() -> None:
    """A run that touches 200 MiB and frees it reports a peak of at least that much, and a run
    that allocates nothing right after reports far less (the peak is reset per run)."""
    cpu = torch.device("cpu")
    with PeakMemory.measure(cpu) as big:
        block = np.ones(200 * 2**20 // 8)  # written: resident, not only reserved
        del block
    with PeakMemory.measure(cpu) as small:
        pass
    assert big.device == "cpu"
    if big.kind == "rss":  # Linux: the peak is reset per run
        assert big.peak_bytes >= 190 * 2**20
        assert small.peak_bytes < 20 * 2**20
    else:  # no reset available: the growth of the lifetime peak
        assert big.kind == "rss_lifetime" and big.peak_bytes >= 100 * 2**20
    assert big.as_dict()["peak_mib"] == round(big.peak_bytes / 2**20, 1)


def test_a_tool_reading_the_process_peak_can_turn_the_reset_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/worker.py`` reads VmHWM as a whole job's peak: with ``reset_rss`` off a run
    leaves it alone and reports the growth of the lifetime peak."""
    monkeypatch.setattr(PeakMemory, "reset_rss", False)
    before = resource_peak()
    with PeakMemory.measure(torch.device("cpu")) as peak:
        pass
    assert peak.kind == "rss_lifetime" and peak.peak_bytes == 0
    assert resource_peak() >= before


def resource_peak() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_is_what_torch_allocated() -> None:
    cuda = torch.device("cuda")
    with PeakMemory.measure(cuda) as peak:
        block = torch.ones(64 * 2**20 // 4, device=cuda)
        del block
    assert peak.kind == "cuda_allocated" and peak.peak_bytes >= 64 * 2**20


# -- settings ---------------------------------------------------------------------------------


def test_gpu_settings_reach_the_registry_and_the_loaders(tmp_path: Path) -> None:
    """``[worker] max_warm_models`` caps the registry; ``[[models]] device`` pins the model,
    ``batch_size`` / ``amp`` are the loader options of bundles and TorchScript folders."""
    from dicom_node.settings import load_settings
    from workers.pipeline import build_context

    config = tmp_path / "node.toml"
    config.write_text(f"""
[database]
url = "sqlite:///{tmp_path / 'node.db'}"
[worker]
device = "cpu"
max_warm_models = 1
[[models]]
name = "spleen"
bundle = "models/spleen"
device = "cpu"
batch_size = 4
amp = true
[[models]]
name = "bone"
path = "models/bone"
batch_size = 2
""")
    settings = load_settings(config)
    spleen, bone = settings.models
    assert spleen.options() == {"weights": None, "batch_size": 4, "amp": True} and spleen.device == "cpu"
    assert bone.options() == {"batch_size": 2, "amp": None} and bone.device == "auto"
    assert settings.worker.max_warm_models == 1
    ctx = build_context(settings)
    assert ctx.registry.max_warm == 1
    assert ctx.registry.device_for("spleen") == torch.device("cpu")
    from dicom_node.settings import WorkerSettings

    assert WorkerSettings().max_warm_models == 2
