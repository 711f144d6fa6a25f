"""Device settings of a model run: device choice, mixed precision, and peak memory per job.

Kept in one place so every model kind (TorchScript cards, MONAI bundles, nnU-Net) makes the
same choices, and so the choices can be tested on a machine without CUDA: the functions take
a ``torch.device`` and decide from its type, they do not need the device to exist.

- :func:`resolve_device`: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` to a device, with
  a clear error when the worker has no such device (a config error, not a crash mid-job);
- :func:`amp_dtype` / :func:`autocast`: float16 autocast on CUDA; on the CPU mixed precision
  is *off* (a no-op): CPU autocast means bfloat16, which only pays on CPUs with AMX/AVX512-BF16,
  is slower than float32 elsewhere, and rounds the logits to 8 bits of mantissa (results that
  differ from the validated ones for nothing);
- :class:`PeakMemory`: the job's peak memory: on CUDA ``torch.cuda.max_memory_allocated``
  (reset before the run), on the CPU the growth of the process's peak resident set over the
  run (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``, else ``ru_maxrss``).

CUDA streams: a model runs on the default stream of its process.  A worker process runs one
job at a time and the only concurrent work in it (the prefetch thread) is file reading on the
CPU, so a dedicated stream per model would overlap nothing; it would only add the
synchronisation every library (MONAI's inverse transforms, nnU-Net) needs before reading
results back on the host.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from inference.errors import PermanentError

#: The values a ``device`` setting may take (``cuda:N`` for any N).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(preference: str = "auto", *, cuda_devices: int | None = None) -> torch.device:
    """The device a preference names; ``"auto"`` is CUDA when present, else the CPU.

    ``cuda_devices`` (default: ``torch.cuda.device_count()``) is how many CUDA devices this
    process sees; asking for one it does not have raises :class:`PermanentError`.
    """
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if preference == "auto":
        return torch.device("cuda" if count > 0 else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise PermanentError(f"device {preference!r} is not one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise PermanentError(f"device {preference!r} is not one of {', '.join(DEVICE_CHOICES)}")
    index = device.index or 0
    if index >= count:
        raise PermanentError(
            f"device {preference!r} asked for, but this worker sees {count} CUDA device(s)"
        )
    return device


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: float16 on CUDA, None (off) elsewhere."""
    return torch.float16 if amp and device.type == "cuda" else None


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` when :func:`amp_dtype` says so, else a no-op context."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def free_device_memory(device: torch.device) -> None:
    """Give memory cached by PyTorch's CUDA allocator back to the driver (after an eviction)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- peak memory -----------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs sets the peak RSS (VmHWM) to the current RSS."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


@dataclass
class PeakMemory:
    """The peak memory of one run, as :meth:`measure` found it."""

    device: str
    #: ``cuda_allocated``: peak bytes PyTorch allocated on the device during the run;
    #: ``rss``: growth of the process's peak resident set over its resident set at the start
    #: (everything the process held, the prefetch thread's volume included);
    #: ``rss_lifetime``: growth of the process's all-time peak (no reset available: 0 when an
    #: earlier job peaked higher).
    kind: str
    peak_bytes: int

    #: Reset the process's peak RSS per run (Linux).  The reset is process-wide: a tool that
    #: reads ``VmHWM`` as the peak of a whole job or process (``benchmarks/worker.py``) turns
    #: it off, and the runs then report ``rss_lifetime``.
    reset_rss: ClassVar[bool] = True

    def as_dict(self) -> dict[str, Any]:
        """For the job's results (JSON)."""
        return {"device": self.device, "kind": self.kind, "peak_bytes": int(self.peak_bytes),
                "peak_mib": round(self.peak_bytes / 2**20, 1)}

    @classmethod
    @contextlib.contextmanager
    def measure(cls, device: torch.device) -> Iterator[PeakMemory]:
        """Measure around the ``with`` body; the yielded object is filled in when it ends."""
        peak = cls(str(device), "cuda_allocated" if device.type == "cuda" else "rss", 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                yield peak
            finally:
                torch.cuda.synchronize(device)
                peak.peak_bytes = int(torch.cuda.max_memory_allocated(device))
            return
        start_kib = _status_kib("VmRSS") if cls.reset_rss and _reset_rss_peak() else None
        start_max = _maxrss_bytes()
        try:
            yield peak
        finally:
            high_kib = _status_kib("VmHWM") if start_kib is not None else None
            if start_kib is not None and high_kib is not None:
                peak.peak_bytes = max(0, high_kib - start_kib) * 1024
            else:
                peak.kind = "rss_lifetime"
                peak.peak_bytes = max(0, _maxrss_bytes() - start_max)
