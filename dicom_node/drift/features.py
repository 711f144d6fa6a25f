"""A finished job as flat drift features: what the model was given and what it said.

Inputs come from the headers the worker already read to build the volume (the first source
instance: series-level attributes) and from the volume itself (in-plane spacing, an image noise
estimate); outputs from the model's :class:`~inference.prediction.Prediction`.  Feature names are
fixed, except ``output.volume_ml.<label>`` (one per label name of the model: bounded by the
model).  Values are numbers, or short strings for categorical features (:data:`CATEGORICAL`).
Never a patient attribute.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from inference.prediction import Prediction
    from inference.volume import Volume

#: Header keywords that name the scanner (``dicom_node.drift.scanners``).
SCANNER_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "StationName", "ProtocolName", "SeriesDescription")
#: Features compared per category, not by quantile bins.
CATEGORICAL = frozenset({"input.kernel", "output.positive"})
#: Slices the noise estimate looks at (evenly spaced): enough for a stable median, cheap.
NOISE_SLICES = 8
_LABEL = re.compile(r"[^a-z0-9]+")


def _float(value: Any) -> float | None:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def scanner_headers(sources: Sequence[Any]) -> dict[str, Any]:
    """The scanner-naming attributes of the series (from its first source header)."""
    first = sources[0] if sources else None
    return {k: getattr(first, k, None) for k in SCANNER_KEYWORDS}


def noise_estimate(array: np.ndarray) -> float | None:
    """Robust image noise (the volume's units: HU for CT) from a few slices.

    The median absolute deviation of horizontally neighbouring voxel differences, scaled to a
    standard deviation (x 1.4826 / sqrt 2): edges are a minority of the differences, so the
    estimate follows the noise, not the anatomy.  A sharper kernel or a lower dose raises it.
    """
    if array.ndim != 3 or array.shape[2] < 2 or array.size == 0:
        return None
    picks = np.unique(np.linspace(0, array.shape[0] - 1, min(NOISE_SLICES, array.shape[0])).astype(int))
    # Every other row of those slices: half the work (about 80 ms for 512 x 512), the same median.
    diffs = np.diff(np.asarray(array[picks, ::2], dtype=np.float32), axis=2).ravel()
    mad = float(np.median(np.abs(diffs - np.median(diffs))))
    return round(1.4826 * mad / float(np.sqrt(2.0)), 3)


def input_features(sources: Sequence[Any], volume: Volume) -> dict[str, Any]:
    """Acquisition features of the series: slice thickness, kVp, kernel, pixel spacing, noise."""
    first = sources[0] if sources else None
    out: dict[str, Any] = {}
    thickness = _float(getattr(first, "SliceThickness", None))
    if thickness is not None:
        out["input.slice_thickness"] = round(thickness, 3)
    kvp = _float(getattr(first, "KVP", None))
    if kvp is not None:
        out["input.kvp"] = round(kvp, 1)
    kernel: Any = getattr(first, "ConvolutionKernel", None)
    if kernel is not None and (isinstance(kernel, list | tuple) or type(kernel).__name__ == "MultiValue"):
        kernel = "\\".join(str(k) for k in kernel)
    out["input.kernel"] = " ".join(str(kernel).split())[:32] if kernel else "(none)"
    spacing = np.linalg.norm(np.asarray(volume.affine)[:3, 1:3], axis=0)
    out["input.pixel_spacing"] = round(float(np.mean(spacing)), 4)
    noise = noise_estimate(np.asarray(volume.array))
    if noise is not None:
        out["input.noise"] = noise
    return out


def _label_key(name: str) -> str:
    return _LABEL.sub("_", name.casefold()).strip("_")[:32] or "unnamed"


def output_features(prediction: Prediction, volume: Volume) -> dict[str, Any]:
    """What the model said: findings, positive yes/no, segment volumes per label, confidence."""
    from inference.prediction import VOLUME, SegmentKind

    try:
        voxel_ml: float | None = volume.voxel_volume_ml
    except ValueError:  # a StackedVolume has no single voxel size: measurements only
        voxel_ml = None
    findings = [s for s in prediction.segments if s.label.kind == SegmentKind.LESION and s.mask.any()]
    out: dict[str, Any] = {
        "output.findings": len(findings),
        "output.positive": "yes" if findings else "no",
        "output.segments": sum(1 for s in prediction.segments if s.mask.any()),
    }
    volumes: dict[str, float] = {}
    for seg in prediction.segments:
        measured = next((m.value for m in seg.measurements if m.name == VOLUME), None)
        ml = measured if measured is not None else (float(seg.mask.sum()) * voxel_ml if voxel_ml else None)
        if ml is not None:
            key = f"output.volume_ml.{_label_key(seg.label.name)}"
            volumes[key] = volumes.get(key, 0.0) + float(ml)
    out.update({k: round(v, 3) for k, v in volumes.items()})
    confidences = [s.confidence for s in prediction.segments if s.confidence is not None]
    if confidences:
        out["output.confidence_max"] = round(max(confidences), 4)
        out["output.confidence_mean"] = round(float(np.mean(confidences)), 4)
    return out
