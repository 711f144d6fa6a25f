"""MONAI bundles as models: loaded with ``monai.bundle.ConfigParser``, run as the bundle says.

A bundle folder (MONAI Model Zoo layout)::

    configs/metadata.json       version, label names (network_data_format.outputs.pred.channel_def)
    configs/inference.json      (or .yaml) network_def, preprocessing, inferer, postprocessing
    models/model.pt             state dict of network_def   (or)  models/model.ts  TorchScript

What the node does with it, in order:

1. parse ``metadata.json`` and ``inference.json`` with MONAI's own ``ConfigParser``, with
   ``bundle_root`` set to the folder and ``device`` set to the worker's device (the bundle's
   own device expression is replaced: the worker picks the device, not the model);
2. build ``network_def`` and load ``models/model.pt`` into it (``torch.load(weights_only=True)``),
   or load ``models/model.ts`` with ``torch.jit.load`` when there is no ``model.pt`` (or the
   configuration says ``weights = "model.ts"``). Nothing is ever downloaded;
3. take the bundle's ``preprocessing`` and drop its loader (``LoadImage``/``LoadImaged``): instead
   the in-memory volume is given as a ``MetaTensor`` laid out exactly as ``LoadImaged`` would
   give a DICOM series read by ITK: array axes (column, row, slice), the RAS affine
   (``diag(-1, -1, 1, 1)`` times the LPS one), no channel axis (``original_channel_dim =
   "no_channel"``) unless the loader had ``ensure_channel_first``; every other transform
   (orientation, spacing, intensity, cropping...) runs as the bundle defines it;
4. run the bundle's ``inferer`` (e.g. ``SlidingWindowInferer``) with the network, under float16
   autocast on CUDA when the bundle's inference config says ``amp`` (top-level ``amp`` or the
   evaluator's ``amp``, as ``monai.bundle run evaluator`` would) or ``[[models]] amp`` does (off
   on the CPU, see :mod:`inference.gpu`); ``[[models]] batch_size`` replaces the inferer's
   ``sw_batch_size``;
5. run the bundle's ``postprocessing`` minus its writers (``SaveImage``/``SaveImaged``): activation,
   ``Invertd`` back to the input grid, ``AsDiscreted``... as the bundle defines them;
6. read the result: one channel is a label map (value = label index), several channels are
   per-label masks when they hold only 0 and 1, else scores (arg-max gives the label index).
   Each label index becomes one SEG segment (see :mod:`inference.labels` for the codes).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.errors import PermanentError, TransientError
from inference.formats import (
    bundle_files,
    bundle_label_names,
    bundle_modalities,
    bundle_version,
    read_metadata,
)
from inference.gpu import autocast
from inference.identity import weights_digest
from inference.labels import LabelOverride, build_labels
from inference.prediction import ML, VOLUME, Label, Measurement, Prediction, Segment
from inference.volume import Volume

#: LPS <-> RAS: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MONAI prints and warns about optional packages (nvImageCodec...) on import and parsing:
    keep that out of the worker's JSON log."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def volume_to_metatensor(volume: Volume, *, channel_first: bool = False) -> Any:
    """The volume as ``LoadImage`` would give the same series: (column, row, slice), RAS affine."""
    from monai.data import MetaTensor  # type: ignore[attr-defined]

    array = np.ascontiguousarray(np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0))
    affine = _LPS_TO_RAS @ volume.affine[:, [2, 1, 0, 3]]
    meta = {
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(array.shape),
        "original_channel_dim": 0 if channel_first else "no_channel",
        "filename_or_obj": "volume",
        "space": "RAS",
    }
    tensor = torch.as_tensor(array[None] if channel_first else array)
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


class MonaiBundleModel:
    """A :class:`~inference.model.Model` running a MONAI bundle (see the module docs)."""

    kind = "monai-bundle"

    def __init__(
        self,
        root: Path,
        device: torch.device,
        *,
        name: str,
        version: str | None = None,
        labels: Sequence[LabelOverride] = (),
        weights: str | None = None,
        batch_size: int | None = None,
        amp: bool | None = None,
    ) -> None:
        self.files = bundle_files(root, weights)
        self.device = device
        self._batch_size = batch_size
        self._amp_setting = amp
        #: Whether the inferer runs under autocast (float16 on CUDA; a no-op on the CPU).
        self.amp = False
        self.name = name
        meta = read_metadata(self.files.metadata)
        self.version = version or bundle_version(meta)
        self.modalities = bundle_modalities(meta)
        self._labels = build_labels(bundle_label_names(meta), labels, model=name)
        self.labels: tuple[Label, ...] = tuple(label for _, label in self._labels)
        self.digest = weights_digest([self.files.weights])
        self._load()

    def _load(self) -> None:
        from monai.bundle import ConfigParser  # type: ignore[attr-defined]
        from monai.transforms import (  # type: ignore[attr-defined]
            Compose,
            LoadImage,
            LoadImaged,
            SaveImage,
            SaveImaged,
        )

        where = f"MONAI bundle {self.files.root}"
        with _quiet():
            parser = ConfigParser()
            try:
                parser.read_meta(str(self.files.metadata))
                parser.read_config(str(self.files.config))
            except Exception as exc:
                raise PermanentError(f"{where}: {self.files.config.name} cannot be parsed: {exc}") from None
            parser["bundle_root"] = str(self.files.root)
            parser["device"] = f"$torch.device({str(self.device)!r})"
            for key in ("preprocessing", "inferer"):
                if key not in parser:
                    raise PermanentError(f"{where}: {self.files.config.name} defines no {key!r}")
            try:
                self.network = self._network(parser)
                preprocessing = parser.get_parsed_content("preprocessing")
                self.inferer = parser.get_parsed_content("inferer")
                self.amp = self._amp_setting if self._amp_setting is not None else self._bundle_amp(parser)
                postprocessing = (
                    parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
                )
            except PermanentError:
                raise
            except Exception as exc:
                raise PermanentError(f"{where}: cannot build its components: {type(exc).__name__}: {exc}") from None
        if self._batch_size is not None:
            if not hasattr(self.inferer, "sw_batch_size"):
                raise PermanentError(
                    f"{where}: batch_size is set but its inferer ({type(self.inferer).__name__}) has no sliding window"
                )
            self.inferer.sw_batch_size = self._batch_size
        if not isinstance(preprocessing, Compose):
            preprocessing = Compose([preprocessing])
        loaders = [t for t in preprocessing.transforms if isinstance(t, LoadImaged | LoadImage)]
        self.image_key = "image"
        self.channel_first = False
        if loaders:
            loader = loaders[0]
            if isinstance(loader, LoadImaged):
                self.image_key = str(loader.keys[0])
                self.channel_first = bool(getattr(loader._loader, "ensure_channel_first", False))
            else:
                self.channel_first = bool(getattr(loader, "ensure_channel_first", False))
        # In place: Invertd in the postprocessing refers to this very Compose.
        preprocessing.transforms = tuple(t for t in preprocessing.transforms if t not in loaders)
        self.preprocessing = preprocessing
        if postprocessing is not None and not isinstance(postprocessing, Compose):
            postprocessing = Compose([postprocessing])
        if postprocessing is not None:
            postprocessing.transforms = tuple(
                t for t in postprocessing.transforms if not isinstance(t, SaveImaged | SaveImage)
            )
        self.postprocessing = postprocessing

    @staticmethod
    def _bundle_amp(parser: Any) -> bool:
        """The bundle's own ``amp``: top-level, else its evaluator's (Model Zoo style)."""
        for key in ("amp", "evaluator#amp"):
            if key in parser:
                return bool(parser.get_parsed_content(key))
        return False

    @property
    def batch_size(self) -> int | None:
        """Patches per network call of the bundle's sliding window (None: not a sliding window)."""
        value = getattr(self.inferer, "sw_batch_size", None)
        return int(value) if value is not None else None

    def _network(self, parser: Any) -> torch.nn.Module:
        weights = self.files.weights
        if self.files.torchscript:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                try:
                    net: torch.nn.Module = torch.jit.load(str(weights), map_location=self.device)  # type: ignore[no-untyped-call]
                except RuntimeError as exc:
                    raise PermanentError(
                        f"MONAI bundle {self.files.root}: {weights.name} is not TorchScript: {exc}"
                    ) from None
        else:
            key = "network_def" if "network_def" in parser else "network"
            if key not in parser:
                raise PermanentError(f"MONAI bundle {self.files.root}: the config defines no network_def")
            net = parser.get_parsed_content(key)
            try:
                state = torch.load(str(weights), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise PermanentError(
                    f"MONAI bundle {self.files.root}: {weights.name} cannot be loaded: {exc}"
                ) from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a CheckpointSaver file: {"model": state_dict, ...}
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise PermanentError(
                    f"MONAI bundle {self.files.root}: {weights.name} does not fit network_def: {exc}"
                ) from None
            net = net.to(self.device)
        net.eval()
        return net

    def predict(self, volume: Volume) -> Prediction:
        """Run the bundle's preprocessing, inferer and postprocessing on the volume."""
        from monai.data import MetaTensor  # type: ignore[attr-defined]

        if self.modalities and volume.modality not in self.modalities:
            raise PermanentError(
                f"model {self.name} accepts {', '.join(sorted(self.modalities))}, got modality {volume.modality!r}"
            )
        key = self.image_key
        try:
            with _quiet(), torch.no_grad():
                data = self.preprocessing({key: volume_to_metatensor(volume, channel_first=self.channel_first)})
                image = data[key]
                batch = (image if isinstance(image, torch.Tensor) else torch.as_tensor(image))[None].to(self.device)
                with autocast(self.device, self.amp):
                    pred = self.inferer(batch, self.network)
                if isinstance(pred, tuple | list):  # deep supervision heads: the first is the output
                    pred = pred[0]
                # float16 under autocast: the postprocessing (softmax, inverse resampling) in float32.
                data["pred"] = pred[0].float()
                if self.postprocessing is not None:
                    data = self.postprocessing(data)
        except torch.cuda.OutOfMemoryError as exc:
            raise TransientError(
                f"CUDA out of memory running {self.name} on a {'x'.join(map(str, volume.shape))} volume"
            ) from exc
        out = data["pred"]
        if isinstance(out, MetaTensor):
            out = out.as_tensor()
        scores = torch.as_tensor(out).detach().cpu()
        if scores.ndim == 3:
            scores = scores[None]
        # Back from (channel, column, row, slice) to (channel, slice, row, column).
        scores = scores.permute(0, 3, 2, 1)
        if tuple(scores.shape[1:]) != volume.shape:
            raise PermanentError(
                f"model {self.name}: the bundle's postprocessing gives shape {tuple(scores.shape[1:])},"
                f" not the input's {volume.shape} (does it end with Invertd?)"
            )
        masks = self._masks(scores)
        segments = []
        for index, label in self._labels:
            mask = masks(index)
            segments.append(
                Segment(
                    label=label,
                    mask=mask,
                    measurements=[Measurement(VOLUME, round(float(mask.sum()) * volume.voxel_volume_ml, 3), ML)],
                )
            )
        return Prediction(self.name, self.version, segments, model_digest=self.digest)

    def _masks(self, scores: torch.Tensor) -> Any:
        if scores.shape[0] == 1:
            labelmap = scores[0].round().to(torch.int64).numpy()
            return lambda index: labelmap == index
        binary = bool(torch.all((scores == 0) | (scores == 1)))
        if binary:
            return lambda index: (
                scores[index].numpy() > 0.5 if index < scores.shape[0] else np.zeros(scores.shape[1:], dtype=bool)
            )
        labelmap = scores.argmax(dim=0).numpy()
        return lambda index: labelmap == index

