"""An image volume: voxels plus the exact geometry that maps them to patient space."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Volume:
    """A 3D image in the patient coordinate system (DICOM LPS, millimetres).

    Parameters
    ----------
    array:
        Voxel values, shape ``(slices, rows, columns)``; for CT in Hounsfield units (rescale
        slope/intercept already applied), float32.
    affine:
        4x4 matrix mapping a voxel index ``(slice, row, column, 1)`` to ``(x, y, z, 1)`` in
        LPS millimetres.  Column 0 is the step between slices (may be sheared for gantry
        tilt), column 1 the step between rows, column 2 the step between columns.
    modality:
        DICOM Modality of the source (``"CT"``, ``"MR"``...): models check it, nothing else.
    metadata:
        Free-form hints a model may use (e.g. ``{"body_part": "CHEST"}``), never identifying.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (slices, rows, columns), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Distance in mm between neighbouring voxels along (slice, row, column)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (the parallelepiped spanned by the axes)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_to_patient(self, index: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` (slice, row, column) to LPS mm ``(..., 3)``."""
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(idx @ self.affine[:3, :3].T + self.affine[:3, 3])

    def patient_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map LPS mm points ``(..., 3)`` to (fractional) voxel indices ``(..., 3)``."""
        inv = np.linalg.inv(self.affine)
        pts = np.asarray(points, dtype=np.float64)
        return np.asarray(pts @ inv[:3, :3].T + inv[:3, 3])
