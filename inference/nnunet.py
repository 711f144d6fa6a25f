"""nnU-Net v2 result folders as models, predicted with nnU-Net's own ``nnUNetPredictor``.

A result folder (``Dataset…/nnUNetTrainer__nnUNetPlans__3d_fullres``, also the layout of
TotalSegmentator's weights)::

    dataset.json                label names ("labels": {"background": 0, "spleen": 1, ...})
    plans.json                  spacing, normalisation, patch size, network architecture
    fold_0/checkpoint_final.pth weights (one folder per fold; "fold_all" for a model on all data)

The volume goes to ``nnUNetPredictor.predict_single_npy_array`` in memory, with its spacing as
the only image property: no NIfTI file is written or read.  nnU-Net then does its own
preprocessing (crop to non-zero, resampling to the plan's spacing, CT/z-score normalisation),
sliding-window prediction over the chosen folds (averaged), and resampling back.

Axis order: nnU-Net sees images as SimpleITK reads them, array ``(z, y, x)`` with the spacing in
the same order.  ``orientation = "RAS"`` (default) first turns the volume to the closest
canonical orientation as ``nibabel.as_closest_canonical`` would (what TotalSegmentator does
before it calls nnU-Net, and how most NIfTI training sets are stored), i.e. array axes running
towards superior, anterior and the patient's right; ``"native"`` gives the array as the DICOM
series is stored (slices, rows, columns), as SimpleITK reads a DICOM series.  Either way the
label map is turned back to the volume's own grid.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from inference.errors import PermanentError, TransientError
from inference.formats import Fold, checkpoint_paths, dataset_modalities, nnunet_label_names, read_json
from inference.identity import weights_digest
from inference.labels import LabelOverride, build_labels
from inference.prediction import ML, VOLUME, Label, Measurement, Prediction, Segment
from inference.volume import Volume


def canonical_axes(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """Permutation and flips that turn a ``(slice, row, column)`` array into ``(S, A, R)`` order
    (index rising towards superior, anterior, the patient's right), as
    ``nibabel.as_closest_canonical`` followed by a SimpleITK read gives it."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    dominant = [int(np.argmax(np.abs(directions[:, a]))) for a in range(3)]
    if sorted(dominant) != [0, 1, 2]:
        raise PermanentError("the volume's axes are too oblique to find its closest canonical orientation")
    # LPS component: z (2) first, then y (1), then x (0).
    perm = (dominant.index(2), dominant.index(1), dominant.index(0))
    # +z is superior; anterior and right are -y and -x in LPS.
    flips = tuple(a for a in range(3) if (directions[dominant[a], a] < 0) == (dominant[a] == 2))
    return perm, flips


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """nnU-Net prints (unset nnUNet_raw paths, device notes): keep that out of the JSON log."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class NnUNetModel:
    """A :class:`~inference.model.Model` predicting with ``nnUNetPredictor`` (see the module docs)."""

    kind = "nnunet"

    def __init__(
        self,
        root: Path,
        device: torch.device,
        *,
        name: str,
        version: str | None = None,
        folds: Sequence[Fold] | None = None,
        checkpoint: str = "checkpoint_final.pth",
        labels: Sequence[LabelOverride] = (),
        orientation: Literal["RAS", "native"] = "RAS",
        tile_step_size: float = 0.5,
        mirroring: bool = True,
        modalities: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.device = device
        self.name = name
        self.folds, paths = checkpoint_paths(self.root, folds, checkpoint)
        dataset = read_json(self.root / "dataset.json")
        read_json(self.root / "plans.json")
        self._labels = build_labels(nnunet_label_names(dataset, self.root), labels, model=name)
        self.labels: tuple[Label, ...] = tuple(label for _, label in self._labels)
        self.digest = weights_digest(paths)
        self.version = version or f"sha256-{self.digest[:12]}"
        self.modalities = frozenset(modalities) if modalities is not None else dataset_modalities(dataset, self.root)
        self.orientation = orientation
        with _quiet():
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            self.predictor = nnUNetPredictor(
                tile_step_size=tile_step_size,
                use_gaussian=True,
                use_mirroring=mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                self.predictor.initialize_from_trained_model_folder(
                    str(self.root), use_folds=tuple(self.folds), checkpoint_name=checkpoint
                )
            except Exception as exc:
                raise PermanentError(
                    f"nnU-Net folder {self.root} cannot be loaded: {type(exc).__name__}: {exc}"
                ) from None

    def predict(self, volume: Volume) -> Prediction:
        """Predict the label map with nnU-Net and report one segment per label."""
        if self.modalities and volume.modality not in self.modalities:
            raise PermanentError(
                f"model {self.name} accepts {', '.join(sorted(self.modalities))}, got modality {volume.modality!r}"
            )
        array = np.asarray(volume.array, dtype=np.float32)
        spacing = volume.spacing
        perm: tuple[int, int, int] = (0, 1, 2)
        flips: tuple[int, ...] = ()
        if self.orientation == "RAS":
            perm, flips = canonical_axes(volume.affine)
            array = np.flip(array, flips) if flips else array
            array = array.transpose(perm)
            spacing = (spacing[perm[0]], spacing[perm[1]], spacing[perm[2]])
        try:
            with _quiet(), torch.no_grad():
                labelmap = self.predictor.predict_single_npy_array(
                    np.ascontiguousarray(array)[None], {"spacing": [float(s) for s in spacing]}
                )
        except torch.cuda.OutOfMemoryError as exc:
            raise TransientError(
                f"CUDA out of memory running {self.name} on a {'x'.join(map(str, volume.shape))} volume"
            ) from exc
        labelmap = np.asarray(labelmap).transpose(np.argsort(perm))
        if flips:
            labelmap = np.flip(labelmap, flips)
        segments = []
        for index, label in self._labels:
            mask = np.ascontiguousarray(labelmap == index)
            segments.append(
                Segment(
                    label=label,
                    mask=mask,
                    measurements=[Measurement(VOLUME, round(float(mask.sum()) * volume.voxel_volume_ml, 3), ML)],
                )
            )
        return Prediction(self.name, self.version, segments, model_digest=self.digest)

