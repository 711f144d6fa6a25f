"""Encode a prediction into the result objects of the output types asked for."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.results.common import (
    ResultOptions,
    ResultUIDs,
    check_geometry,
    check_prediction,
    source_frames,
    source_series_uid,
)
from dicom_node.results.context import EncodeContext
from dicom_node.results.registry import closure, output_type
from inference.prediction import Prediction
from inference.volume import Volume


@dataclass(frozen=True)
class EncodedResults:
    """The SEG (None when no segment has a voxel: no empty SEG is sent) and the SR."""

    seg: Dataset | None
    sr: Dataset


def encode_outputs(
    prediction: Prediction,
    volume: Volume,
    sources: Sequence[Dataset],
    frame_refs: Sequence[tuple[int, int]],
    outputs: Iterable[str],
    options: ResultOptions | None = None,
    pixels: Mapping[int, np.ndarray] | None = None,
) -> dict[str, list[Dataset]]:
    """Encode ``prediction`` as every output type of ``outputs`` (plus those they need).

    Parameters
    ----------
    prediction, volume, sources, frame_refs, options:
        As for :func:`encode_results`.
    outputs:
        Output type names (:func:`dicom_node.results.registry.output_names`).
    pixels:
        Voxel values of the slices the renderers need (see :func:`rendered_slices`); by default
        they are read from ``volume.array``.

    Returns
    -------
    Output type -> its datasets (an empty list when it has nothing to encode), in encoding order.

    Raises
    ------
    ResultEncodingError
        When masks, volume geometry and source frames do not fit together.
    KeyError
        For an unknown output type.
    """
    options = (options or ResultOptions()).resolved()
    names = closure(outputs)
    frames = source_frames(sources, frame_refs)
    check_geometry(frames, volume)
    check_prediction(prediction, volume.shape)
    uids = ResultUIDs(
        source_series_uid(frames), prediction.model_name, prediction.model_version, prediction.model_digest
    )
    if pixels is None:
        pixels = _LazySlices(volume)
    ctx = EncodeContext(prediction, volume, frames, uids, options, pixels)
    for name in names:
        ctx.results[name] = output_type(name).encoder(ctx)
    return ctx.results


class _LazySlices(Mapping[int, np.ndarray]):
    """Slices of a volume read on demand."""

    def __init__(self, volume: Volume) -> None:
        self._volume = volume

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self._volume.shape[0]:
            raise KeyError(k)
        return np.asarray(self._volume.array[k])

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self._volume.shape[0]))

    def __len__(self) -> int:
        return self._volume.shape[0]


def rendered_slices(prediction: Prediction, outputs: Iterable[str]) -> list[int]:
    """Indices of the slices whose voxels the asked outputs draw (kept when the volume is freed)."""
    from dicom_node.results.sc import slices_to_render

    names = closure(outputs)
    return slices_to_render(prediction) if ("sc" in names or "gsps" in names) else []


def encode_results(
    prediction: Prediction,
    volume: Volume,
    sources: Sequence[Dataset],
    frame_refs: Sequence[tuple[int, int]],
    options: ResultOptions | None = None,
) -> EncodedResults:
    """Encode ``prediction`` on ``volume`` as a SEG and a Comprehensive 3D SR (TID 1500).

    Parameters
    ----------
    prediction:
        What the model found, masks in the voxel grid of ``volume``.
    volume:
        The volume the model saw; its slice ``k`` comes from ``frame_refs[k]``.
    sources:
        The source image datasets (headers suffice: pixel data is never read).
    frame_refs:
        One ``(index into sources, 1-based frame number)`` per volume slice, sorted spatially.
    options:
        Series numbers, equipment, SEG type and transfer syntax.

    Raises
    ------
    ResultEncodingError
        When masks, volume geometry and source frames do not fit together.
    """
    results = encode_outputs(prediction, volume, sources, frame_refs, ("seg", "sr"), options)
    seg = results["seg"][0] if results["seg"] else None
    return EncodedResults(seg=seg, sr=results["sr"][0])
