"""``ct-tissue``: body, lungs, bone and adipose tissue of a CT by Hounsfield-unit thresholds.

Classical image analysis, no weights: thresholds on the device the model was created with,
then connected components (MONAI, ``scipy.ndimage``), morphology and hole filling
(``scipy.ndimage`` through :mod:`inference.ops`), which run on the CPU.

- **body**: the largest connected region above -500 HU (air is -1000, fat -100), after an
  in-plane erosion of 3 mm cut thin bridges to the table or to noise, with every axial slice's
  enclosed holes (lungs, airways, bowel gas) filled.
- **lungs**: air-like voxels (below -400 HU, half-way between lung parenchyma and soft tissue)
  whose 6-connected component lies wholly inside the body, i.e. is not the outside air reaching
  in; components under 20 ml or under 5 % of the largest one are dropped (bowel gas, noise);
  vessels (the holes inside the lung in each slice) are filled in.  The airways join the lungs.
- **bone**: above 250 HU inside the body (cortical and most trabecular bone; iodinated contrast
  and metal are counted too).
- **adipose tissue**: -190..-30 HU inside the body, except the voxels touching the lungs, where
  the partial volume of lung and soft tissue passes through the fat range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms.utils import get_largest_connected_component_mask

from inference import ops
from inference.errors import PermanentError
from inference.prediction import (
    ANATOMICAL_STRUCTURE,
    ENTIRE_BODY,
    HU,
    LUNG,
    MEAN,
    ML,
    SCT,
    TISSUE,
    VOLUME,
    Code,
    Label,
    Measurement,
    Prediction,
    Segment,
    SegmentKind,
)
from inference.volume import Volume

# Coded concepts as DICOM lists them (CID 7150 categories, CID 7151/7166 types); the shared
# ones (ANATOMICAL_STRUCTURE, TISSUE, ENTIRE_BODY, LUNG) live in inference.prediction.
BONE = Code("3138006", SCT, "Bone")
FAT = Code("55603005", SCT, "Fat")

BODY_LABEL = Label("body", ANATOMICAL_STRUCTURE, ENTIRE_BODY, SegmentKind.REGION, (177, 122, 101))
LUNGS_LABEL = Label("lungs", ANATOMICAL_STRUCTURE, LUNG, SegmentKind.REGION, (197, 165, 145))
BONE_LABEL = Label("bone", TISSUE, BONE, SegmentKind.REGION, (241, 214, 145))
ADIPOSE_LABEL = Label("adipose tissue", TISSUE, FAT, SegmentKind.REGION, (230, 220, 70))

BODY_MIN_HU = -500.0
LUNG_MAX_HU = -400.0
BONE_MIN_HU = 250.0
FAT_HU_RANGE = (-190.0, -30.0)
#: Bridges to the table (or to noise) thinner than twice this are cut before "largest region".
TABLE_CUT_MM = 3.0
MIN_BODY_ML = 10.0
MIN_LUNG_ML = 20.0
MIN_LUNG_FRACTION = 0.05
MIN_BONE_ML = 0.1
MIN_SLICES = 3
MIN_PIXELS = 32


class CtTissueModel:
    """Body, lungs, bone and adipose tissue masks of a CT volume, with volume and mean HU."""

    name: str = "ct-tissue"
    version: str = "1.0.0"
    modalities: frozenset[str] = frozenset({"CT"})
    labels: tuple[Label, ...] = (BODY_LABEL, LUNGS_LABEL, BONE_LABEL, ADIPOSE_LABEL)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def predict(self, volume: Volume) -> Prediction:
        """Segment ``volume``; raise :class:`PermanentError` for input this model cannot use."""
        self._check(volume)
        hu = torch.as_tensor(np.asarray(volume.array, dtype=np.float32)).to(self.device)
        if not math.isfinite(float(hu.sum())):
            raise PermanentError(f"{self.name} needs finite HU values, the volume has NaN or inf")
        voxel_ml = volume.voxel_volume_ml
        body = self._body(hu, volume.spacing, voxel_ml)
        lungs = self._lungs(hu, body, voxel_ml)
        bone = ops.remove_small_components(
            (hu > BONE_MIN_HU).logical_and_(body), math.ceil(MIN_BONE_ML / voxel_ml)
        )
        # In place: each full-volume temporary costs a byte per voxel (256 MiB for 1,000 slices).
        fat = (hu >= FAT_HU_RANGE[0]).logical_and_(hu <= FAT_HU_RANGE[1]).logical_and_(body)
        fat.logical_and_(ops.binary_dilation(lungs, (1, 1, 1)).logical_not_())

        prediction = Prediction(model_name=self.name, model_version=self.version)
        for label, mask in zip(self.labels, (body, lungs, bone, fat), strict=True):
            # count_nonzero, not sum(): summing a bool tensor first copies it to int64.
            count = int(torch.count_nonzero(mask))
            if count == 0:
                prediction.notes.append(f"no {label.name} found")
                continue
            mean_hu = ops.masked_mean(hu, mask)
            prediction.segments.append(
                Segment(
                    label=label,
                    mask=mask.cpu().numpy(),
                    measurements=[
                        Measurement(VOLUME, count * voxel_ml, ML),
                        Measurement(MEAN, mean_hu, HU),
                    ],
                )
            )
        return prediction

    def _check(self, volume: Volume) -> None:
        if volume.modality != "CT":
            raise PermanentError(f"{self.name} accepts CT, got {volume.modality or 'no modality'}")
        slices, rows, columns = volume.shape
        if slices < MIN_SLICES:
            raise PermanentError(f"{self.name} needs at least {MIN_SLICES} slices, got {slices}")
        if rows < MIN_PIXELS or columns < MIN_PIXELS:
            raise PermanentError(
                f"{self.name} needs slices of at least {MIN_PIXELS}x{MIN_PIXELS} pixels, "
                f"got {rows}x{columns}"
            )

    def _body(
        self, hu: torch.Tensor, spacing: tuple[float, float, float], voxel_ml: float
    ) -> torch.Tensor:
        candidate = hu > BODY_MIN_HU
        _, ry, rx = ops.radius_in_voxels(TABLE_CUT_MM, spacing)
        # connectivity=1: one orthogonal hop, the 6-neighbourhood.
        core = get_largest_connected_component_mask(
            ops.binary_erosion(candidate, (0, ry, rx)), connectivity=1
        )
        # Grow the core back to the candidate's own boundary, without the parts cut off.
        grown = ops.binary_dilation(core, (0, ry + 1, rx + 1)).logical_and_(candidate)
        del core, candidate
        body = get_largest_connected_component_mask(grown, connectivity=1)
        del grown
        body_ml = int(torch.count_nonzero(body)) * voxel_ml
        if body_ml < MIN_BODY_ML:
            raise PermanentError(
                f"{self.name} found no body: the largest region above {BODY_MIN_HU:g} HU "
                f"thicker than {2 * TABLE_CUT_MM:g} mm is {body_ml:.1f} ml, "
                f"less than {MIN_BODY_ML:g} ml"
            )
        return ops.fill_holes_per_slice(body)

    def _lungs(self, hu: torch.Tensor, body: torch.Tensor, voxel_ml: float) -> torch.Tensor:
        air = hu < LUNG_MAX_HU
        # The components of air touching the outside are a subset of air: XOR removes them.
        enclosed = air.logical_xor_(ops.components_touching(air, ~body, connectivity=6))
        kept = ops.remove_small_components(
            enclosed,
            math.ceil(MIN_LUNG_ML / voxel_ml),
            connectivity=6,
            min_fraction=MIN_LUNG_FRACTION,
        )
        del enclosed
        return ops.fill_holes_per_slice(kept).logical_and_(body)
