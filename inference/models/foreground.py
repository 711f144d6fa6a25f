"""``foreground``: the body (or head) mask of an image of any modality, MR included.

Otsu's threshold splits the intensities into background and object; a small in-plane closing
bridges gaps in a thin bright rim (the scalp around the dark skull in MR), each axial slice's
enclosed holes are filled (lungs in CT, skull, CSF and ventricles in MR) and the largest
connected region is kept (the table and background noise fall away).  The segment is
coded as the head when the volume's ``body_part`` hint says so, else as the entire body.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms.utils import get_largest_connected_component_mask
from skimage.filters import threshold_otsu

from inference import ops
from inference.errors import PermanentError
from inference.prediction import (
    ANATOMICAL_STRUCTURE,
    ENTIRE_BODY,
    ML,
    SCT,
    VOLUME,
    Code,
    Label,
    Measurement,
    Prediction,
    Segment,
)
from inference.volume import Volume

BODY_LABEL = Label("body", ANATOMICAL_STRUCTURE, ENTIRE_BODY)
HEAD_LABEL = Label("head", ANATOMICAL_STRUCTURE, Code("69536005", SCT, "Head"))
#: ``Volume.metadata["body_part"]`` values (DICOM Body Part Examined) that mean a head image.
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL"})
MIN_PIXELS = 8
#: In-plane radius of the closing that bridges gaps in a bright rim before the holes are filled.
CLOSING_MM = 3.0


class ForegroundModel:
    """One REGION segment: everything that is not background, with its volume."""

    name: str = "foreground"
    version: str = "1.0.0"
    #: Any modality.
    modalities: frozenset[str] = frozenset()
    labels: tuple[Label, ...] = (BODY_LABEL, HEAD_LABEL)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def predict(self, volume: Volume) -> Prediction:
        """Segment the foreground of ``volume``; raise :class:`PermanentError` if there is none."""
        _, rows, columns = volume.shape
        if rows < MIN_PIXELS or columns < MIN_PIXELS:
            raise PermanentError(
                f"{self.name} needs slices of at least {MIN_PIXELS}x{MIN_PIXELS} pixels, "
                f"got {rows}x{columns}"
            )
        image = torch.as_tensor(np.asarray(volume.array, dtype=np.float32)).to(self.device)
        if not math.isfinite(float(image.sum())):
            raise PermanentError(
                f"{self.name} needs finite voxel values, the volume has NaN or inf"
            )
        lo, hi = (float(v) for v in torch.aminmax(image))
        if hi <= lo:
            raise PermanentError(f"{self.name} needs an image with contrast, every voxel is {lo:g}")
        # scikit-image's Otsu (256 bins) runs on the CPU; the volume's values are finite here.
        threshold = float(threshold_otsu(image.cpu().numpy()))  # type: ignore[no-untyped-call]
        _, ry, rx = ops.radius_in_voxels(CLOSING_MM, volume.spacing)
        closed = ops.binary_closing(image > threshold, (0, max(ry, 1), max(rx, 1)))
        # connectivity=1: one orthogonal hop, the 6-neighbourhood.
        mask = get_largest_connected_component_mask(ops.fill_holes_per_slice(closed), connectivity=1)
        # Otsu always leaves some voxels above the threshold, so the mask is never empty.
        count = int(mask.sum())
        body_part = volume.metadata.get("body_part", "").strip().upper()
        label = HEAD_LABEL if body_part in HEAD_BODY_PARTS else BODY_LABEL
        segment = Segment(
            label=label,
            mask=mask.cpu().numpy(),
            measurements=[Measurement(VOLUME, count * volume.voxel_volume_ml, ML)],
        )
        return Prediction(model_name=self.name, model_version=self.version, segments=[segment])
