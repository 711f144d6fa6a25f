"""What an output encoder reads: :class:`EncodeContext` (kept apart from the registry, which
imports the encoders, so the encoders need not import it back)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset

    from dicom_node.results.common import ResultOptions, ResultUIDs, SourceFrames
    from inference.prediction import Prediction, Segment
    from inference.volume import Volume


@dataclass
class EncodeContext:
    """Everything an encoder may read; ``results`` holds what earlier encoders produced."""

    prediction: Prediction
    volume: Volume
    frames: SourceFrames
    uids: ResultUIDs
    options: ResultOptions
    #: Voxel values of the slices kept for rendering (index -> 2D array, the volume's units);
    #: the pipeline frees the rest of the volume before encoding.
    pixels: Mapping[int, np.ndarray]
    #: Output type -> its datasets, in encoding order.
    results: dict[str, list[Dataset]] = field(default_factory=dict)
    #: The segments that get a SEG segment (numbered 1.. in this order).
    segments_with_voxels: list[Segment] = field(init=False)
    #: Tracking id -> SEG segment number.
    segment_numbers: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.segments_with_voxels = [s for s in self.prediction.segments if s.mask.any()]
        self.segment_numbers = {
            s.tracking_id: n for n, s in enumerate(self.segments_with_voxels, start=1)
        }

    def one(self, name: str) -> Dataset | None:
        """The single dataset of output ``name`` when it was encoded, else None."""
        found = self.results.get(name) or []
        return found[0] if found else None
