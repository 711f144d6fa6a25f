"""Result encoders: a :class:`~inference.prediction.Prediction` as DICOM SEG + TID 1500 SR.

``encode_results`` is the one entry point.  Every UID derives from (source series, model name,
model version), so a retried job produces byte-for-byte the same identities and an archive
replaces instead of duplicating.  See ``docs/results.md`` for what the objects contain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.results.common import (
    ResultEncodingError,
    ResultOptions,
    ResultUIDs,
    check_geometry,
    check_prediction,
    source_frames,
    source_series_uid,
)
from dicom_node.results.seg import encode_seg
from dicom_node.results.sr import encode_sr
from inference.prediction import Prediction
from inference.volume import Volume

__all__ = ["EncodedResults", "ResultEncodingError", "ResultOptions", "ResultUIDs", "encode_results"]


@dataclass(frozen=True)
class EncodedResults:
    """The SEG (None when no segment has a voxel: no empty SEG is sent) and the SR."""

    seg: Dataset | None
    sr: Dataset


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
    options = options or ResultOptions()
    frames = source_frames(sources, frame_refs)
    check_geometry(frames, volume)
    check_prediction(prediction, volume.shape)
    uids = ResultUIDs(
        source_series_uid(frames), prediction.model_name, prediction.model_version, prediction.model_digest
    )
    in_seg = [s for s in prediction.segments if s.mask.any()]
    seg = encode_seg(prediction, in_seg, frames, uids, options) if in_seg else None
    numbers = {s.tracking_id: n for n, s in enumerate(in_seg, start=1)}
    sr = encode_sr(prediction, volume, frames, seg, numbers, uids, options)
    return EncodedResults(seg=seg, sr=sr)
