"""User-supplied models: a TorchScript file plus a ``model.toml`` card, and entry-point plugins.

A model directory holds ``model.pt`` (``torch.jit.save``) and ``model.toml``::

    name = "ct-bone"
    version = "1.0.0"
    modalities = ["CT"]              # empty list: any modality

    [input]
    spacing = "native"               # or [slice, row, column] mm: resample to it first
    orientation = "native"           # or "LPS": flip axes so they run +z, +y, +x
    normalisation = { kind = "window", min = -1000, max = 400 }   # or "zscore", "none"

    [inference]
    patch_size = [32, 64, 64]        # slices, rows, columns
    overlap = 0.25
    blend = "gaussian"               # or "uniform"
    amp = true                       # float16 autocast on CUDA (off on the CPU)

    [output]
    activation = "sigmoid"           # the network gives logits; "softmax" or "none" (probabilities)
    threshold = 0.5

    [[labels]]
    name = "Bone"
    channel = 0
    kind = "region"                  # or "lesion"
    category = { value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }
    type = { value = "272673000", scheme = "SCT", meaning = "Bone" }
    color = [255, 255, 255]          # optional

The network takes ``(1, 1, *patch_size)`` float32 and returns ``(1, channels, *patch_size)``.
"""

from __future__ import annotations

import math
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers.utils import sliding_window_inference as monai_sliding_window

from inference.errors import PermanentError, TransientError
from inference.formats import ENTRY_POINT_GROUP
from inference.gpu import autocast
from inference.identity import file_digest
from inference.labels import LabelOverride
from inference.model import Model
from inference.prediction import (
    ML,
    VOLUME,
    Code,
    Label,
    Measurement,
    Prediction,
    Segment,
    SegmentKind,
)
from inference.registry import ModelFactory
from inference.volume import Volume

Blend = Literal["gaussian", "uniform"]
PatchFn = Callable[[torch.Tensor], torch.Tensor]
CARD_NAME = "model.toml"
WEIGHTS_NAME = "model.pt"


def sliding_window_inference(
    volume_tensor: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float,
    fn: PatchFn,
    device: torch.device,
    amp: bool = False,
    *,
    blend: Blend = "gaussian",
    pad_value: float | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Run ``fn`` over overlapping patches of a volume and blend the outputs, with MONAI's
    ``sliding_window_inference`` (``batch_size`` patches per call of ``fn``).

    Parameters
    ----------
    volume_tensor:
        ``(slices, rows, columns)`` or ``(channels, slices, rows, columns)``, on any device.
    patch_size:
        Patch ``(slices, rows, columns)`` in voxels.
    overlap:
        Fraction of a patch shared with its neighbour along each axis, in ``[0, 1)``.
    fn:
        Maps a batch ``(n, channels, *patch_size)`` on ``device`` to ``(n, classes, *patch_size)``,
        ``n`` up to ``batch_size``.
    device:
        Where ``fn`` runs (MONAI's ``sw_device``); patches move there one at a time, the blended
        output stays on the device of ``volume_tensor`` (a GPU volume stays on the GPU).
    amp:
        Run ``fn`` under ``torch.autocast`` (float16), on CUDA only; ignored elsewhere
        (:func:`inference.gpu.autocast`).
    blend:
        ``"gaussian"`` (MONAI's importance map, sigma = 0.125 x patch size: a patch's centre,
        where the network saw most context, weighs more than its edges) or ``"uniform"``.
    pad_value:
        Value used to pad a volume smaller than the patch; default the volume's minimum.
    batch_size:
        Patches per call (MONAI's ``sw_batch_size``): more keep a GPU busier, at the cost of
        ``batch_size`` times the activation memory.

    Returns
    -------
    torch.Tensor
        ``(classes, slices, rows, columns)`` float32 on the device of ``volume_tensor``.
    """
    image = volume_tensor[None] if volume_tensor.dim() == 3 else volume_tensor
    if image.dim() != 4:
        raise ValueError(
            f"volume must be 3D or 4D (channels first), got shape {tuple(volume_tensor.shape)}"
        )
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be three positive integers, got {tuple(patch_size)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in ("gaussian", "uniform"):
        raise ValueError(f"blend must be 'gaussian' or 'uniform', got {blend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    def checked(batch: torch.Tensor) -> torch.Tensor:
        result = fn(batch)
        n = batch.shape[0]
        if result.dim() != 5 or tuple(result.shape[2:]) != patch or result.shape[0] != n:
            raise ValueError(
                f"model output must be ({n}, classes, {', '.join(map(str, patch))}),"
                f" got {tuple(result.shape)}"
            )
        return result.float()

    fill = float(image.min()) if pad_value is None else pad_value
    with torch.no_grad(), autocast(device, amp):
        out = monai_sliding_window(
            image[None],
            roi_size=patch,
            sw_batch_size=batch_size,
            predictor=checked,
            overlap=overlap,
            mode="gaussian" if blend == "gaussian" else "constant",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=fill,
            sw_device=device,
            device=image.device,
        )
    assert isinstance(out, torch.Tensor)  # one tensor in, one tensor out
    return out[0].float().contiguous()


class CardError(PermanentError):
    """A model card is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Normalisation:
    """How voxel values are scaled before the network sees them."""

    kind: Literal["window", "zscore", "none"]
    minimum: float = 0.0
    maximum: float = 1.0

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        if self.kind == "window":
            return (image.clamp(self.minimum, self.maximum) - self.minimum) / (
                self.maximum - self.minimum
            )
        if self.kind == "zscore":
            std = float(image.std())
            return (image - float(image.mean())) / (std if std > 0 else 1.0)
        return image


@dataclass(frozen=True)
class ModelCard:
    """The validated contents of ``model.toml``."""

    name: str
    version: str
    modalities: frozenset[str]
    spacing: tuple[float, float, float] | None  # None: native
    orientation: Literal["native", "LPS"]
    normalisation: Normalisation
    patch_size: tuple[int, int, int]
    overlap: float
    blend: Literal["gaussian", "uniform"]
    amp: bool
    activation: Literal["sigmoid", "softmax", "none"]
    threshold: float
    labels: tuple[Label, ...]
    channels: tuple[int, ...]


class _Card:
    """Typed look-ups in a parsed TOML table whose errors name the key and the file."""

    def __init__(self, data: dict[str, Any], source: Path) -> None:
        self.data = data
        self.source = source

    def fail(self, key: str, problem: str) -> CardError:
        return CardError(f"model card {self.source}: {key!r} {problem}")

    def get(
        self, key: str, default: Any = ..., table: dict[str, Any] | None = None, prefix: str = ""
    ) -> Any:
        where = self.data if table is None else table
        if key not in where:
            if default is ...:
                raise self.fail(prefix + key, "is missing")
            return default
        return where[key]

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def number(self, key: str, value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.fail(key, f"must be a number, got {value!r}")
        return float(value)

    def choice(self, key: str, value: Any, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.fail(key, f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return str(value)

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {value!r}")
        return value

    def code(self, key: str, value: Any) -> Code:
        t = self.table(key, value)
        return Code(
            self.text(f"{key}.value", self.get("value", table=t, prefix=f"{key}.")),
            self.text(f"{key}.scheme", self.get("scheme", table=t, prefix=f"{key}.")),
            self.text(f"{key}.meaning", self.get("meaning", table=t, prefix=f"{key}.")),
        )


def read_card(path: Path) -> ModelCard:
    """Parse and validate a ``model.toml``; raise :class:`CardError` naming the offending key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"model card {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(f"model card {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CardError(f"model card {path} is not valid TOML: {exc}") from None
    c = _Card(data, path)

    name = c.text("name", c.get("name"))
    version = c.text("version", c.get("version"))
    modalities = c.get("modalities", [])
    if not isinstance(modalities, list) or not all(isinstance(m, str) and m for m in modalities):
        raise c.fail(
            "modalities", f"must be a list of DICOM modalities like ['CT'], got {modalities!r}"
        )

    inp = c.table("input", c.get("input", {}))
    raw_spacing = c.get("spacing", "native", inp)
    spacing: tuple[float, float, float] | None
    if raw_spacing == "native":
        spacing = None
    elif isinstance(raw_spacing, list) and len(raw_spacing) == 3:
        values = [c.number("input.spacing", v) for v in raw_spacing]
        if min(values) <= 0:
            raise c.fail("input.spacing", f"must be positive mm, got {raw_spacing!r}")
        spacing = (values[0], values[1], values[2])
    else:
        raise c.fail(
            "input.spacing", f"must be 'native' or [slice, row, column] mm, got {raw_spacing!r}"
        )
    orientation = c.choice(
        "input.orientation", c.get("orientation", "native", inp), ("native", "LPS")
    )
    norm_t = c.table("input.normalisation", c.get("normalisation", {"kind": "none"}, inp))
    kind = c.choice(
        "input.normalisation.kind",
        c.get("kind", table=norm_t, prefix="input.normalisation."),
        ("window", "zscore", "none"),
    )
    if kind == "window":
        lo = c.number(
            "input.normalisation.min", c.get("min", table=norm_t, prefix="input.normalisation.")
        )
        hi = c.number(
            "input.normalisation.max", c.get("max", table=norm_t, prefix="input.normalisation.")
        )
        if hi <= lo:
            raise c.fail("input.normalisation.max", f"must be above min ({lo}), got {hi}")
        normalisation = Normalisation("window", lo, hi)
    else:
        normalisation = Normalisation(kind)  # type: ignore[arg-type]

    inf = c.table("inference", c.get("inference"))
    patch = c.get("patch_size", table=inf, prefix="inference.")
    if (
        not isinstance(patch, list)
        or len(patch) != 3
        or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)
    ):
        raise c.fail("inference.patch_size", f"must be three positive integers, got {patch!r}")
    overlap = c.number("inference.overlap", c.get("overlap", 0.25, inf))
    if not 0.0 <= overlap < 1.0:
        raise c.fail("inference.overlap", f"must be in [0, 1), got {overlap}")
    blend = c.choice("inference.blend", c.get("blend", "gaussian", inf), ("gaussian", "uniform"))
    amp = c.get("amp", False, inf)
    if not isinstance(amp, bool):
        raise c.fail("inference.amp", f"must be true or false, got {amp!r}")

    out = c.table("output", c.get("output", {}))
    activation = c.choice(
        "output.activation", c.get("activation", "sigmoid", out), ("sigmoid", "softmax", "none")
    )
    threshold = c.number("output.threshold", c.get("threshold", 0.5, out))
    if not 0.0 < threshold < 1.0:
        raise c.fail("output.threshold", f"must be in (0, 1), got {threshold}")

    raw_labels = c.get("labels")
    if not isinstance(raw_labels, list) or not raw_labels:
        raise c.fail("labels", "must be a non-empty array of tables ([[labels]])")
    labels: list[Label] = []
    channels: list[int] = []
    for i, raw in enumerate(raw_labels):
        key = f"labels[{i}]"
        t = c.table(key, raw)
        channel = c.get("channel", table=t, prefix=f"{key}.")
        if not isinstance(channel, int) or isinstance(channel, bool) or channel < 0:
            raise c.fail(f"{key}.channel", f"must be a non-negative integer, got {channel!r}")
        if channel in channels:
            raise c.fail(f"{key}.channel", f"repeats channel {channel}")
        color = t.get("color")
        if color is not None and (
            not isinstance(color, list)
            or len(color) != 3
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in color)
        ):
            raise c.fail(f"{key}.color", f"must be three integers 0-255, got {color!r}")
        labels.append(
            Label(
                name=c.text(f"{key}.name", c.get("name", table=t, prefix=f"{key}.")),
                category=c.code(f"{key}.category", c.get("category", table=t, prefix=f"{key}.")),
                type=c.code(f"{key}.type", c.get("type", table=t, prefix=f"{key}.")),
                kind=SegmentKind(
                    c.choice(f"{key}.kind", t.get("kind", "region"), ("region", "lesion"))
                ),
                color=None if color is None else (color[0], color[1], color[2]),
            )
        )
        channels.append(channel)
    return ModelCard(
        name=name,
        version=version,
        modalities=frozenset(modalities),
        spacing=spacing,
        orientation=orientation,  # type: ignore[arg-type]
        normalisation=normalisation,
        patch_size=(patch[0], patch[1], patch[2]),
        overlap=overlap,
        blend=blend,  # type: ignore[arg-type]
        amp=amp,
        activation=activation,  # type: ignore[arg-type]
        threshold=threshold,
        labels=tuple(labels),
        channels=tuple(channels),
    )


def _lps_flips(affine: np.ndarray) -> tuple[int, ...]:
    """Array axes to flip so slices run +z, rows +y and columns +x (axis-aligned volumes only)."""
    flips = []
    for axis, patient in enumerate((2, 1, 0)):
        direction = affine[:3, axis] / np.linalg.norm(affine[:3, axis])
        if abs(direction[patient]) < 0.9:
            raise PermanentError(
                "orientation 'LPS' needs an axial volume whose array axes follow z, y, x; axis"
                f" {axis} points along {np.round(direction, 3).tolist()}"
            )
        if direction[patient] < 0:
            flips.append(axis)
    return tuple(flips)


class TorchScriptModel:
    """A :class:`~inference.model.Model` running a TorchScript network described by a card."""

    kind = "torchscript"

    def __init__(
        self, card: ModelCard, network: torch.jit.ScriptModule, device: torch.device, digest: str = "",
        *, batch_size: int | None = None, amp: bool | None = None,
    ) -> None:
        self.card = card
        #: Patches per network call (``[[models]] batch_size``; default 1).
        self.batch_size = batch_size or 1
        #: ``[[models]] amp`` when given, else the card's ``[inference] amp``.
        self.amp = card.amp if amp is None else amp
        self.network = network
        self.device = device
        self.name = card.name
        self.version = card.version
        self.modalities = card.modalities
        self.labels = card.labels
        self.digest = digest

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        result = self.network(batch)
        if not isinstance(result, torch.Tensor):
            raise PermanentError(
                f"model {self.name} returned {type(result).__name__}, expected a tensor"
            )
        return result

    def predict(self, volume: Volume) -> Prediction:
        """Normalise, resample, run patch-wise, threshold and return one segment per label."""
        if self.modalities and volume.modality not in self.modalities:
            raise PermanentError(
                f"model {self.name} accepts {', '.join(sorted(self.modalities))},"
                f" got modality {volume.modality!r}"
            )
        card = self.card
        image = torch.as_tensor(np.ascontiguousarray(volume.array), dtype=torch.float32)
        flips = _lps_flips(volume.affine) if card.orientation == "LPS" else ()
        if flips:
            image = image.flip(flips)
        image = card.normalisation.apply(image)
        source_shape = tuple(image.shape)
        if card.spacing is not None:
            target = tuple(
                max(1, round(n * s / t))
                for n, s, t in zip(source_shape, volume.spacing, card.spacing, strict=True)
            )
            if target != source_shape:
                image = F.interpolate(
                    image[None, None], size=target, mode="trilinear", align_corners=False
                )[0, 0]
        try:
            scores = sliding_window_inference(
                image,
                card.patch_size,
                card.overlap,
                self._run,
                self.device,
                self.amp,
                blend=card.blend,
                batch_size=self.batch_size,
            )
        except torch.cuda.OutOfMemoryError as exc:
            raise TransientError(
                f"CUDA out of memory running {self.name} on a"
                f" {'x'.join(map(str, volume.shape))} volume (retry later or on CPU)"
            ) from exc
        n_channels = scores.shape[0]
        if max(card.channels) >= n_channels:
            raise PermanentError(
                f"model {self.name} returned {n_channels} channels but its card uses"
                f" channel {max(card.channels)}"
            )
        if card.activation == "sigmoid":
            scores = torch.sigmoid(scores)
        elif card.activation == "softmax":
            scores = torch.softmax(scores, dim=0)
        if tuple(scores.shape[1:]) != source_shape:
            # Probabilities go back to the source grid before thresholding: smoother masks.
            scores = F.interpolate(
                scores[None], size=source_shape, mode="trilinear", align_corners=False
            )[0]
        if flips:
            scores = scores.flip([f + 1 for f in flips])
        segments = []
        for label, channel in zip(card.labels, card.channels, strict=True):
            mask = (scores[channel] >= card.threshold).cpu().numpy()
            volume_ml = float(mask.sum()) * volume.voxel_volume_ml
            segments.append(
                Segment(
                    label=label,
                    mask=mask,
                    measurements=[Measurement(VOLUME, round(volume_ml, 3), ML)],
                )
            )
        return Prediction(
            model_name=self.name, model_version=self.version, segments=segments, model_digest=self.digest
        )


def load_user_model(
    path: Path, device: torch.device, *, batch_size: int | None = None, amp: bool | None = None
) -> TorchScriptModel:
    """Load ``path/model.toml`` and ``path/model.pt`` onto ``device``; raise ``PermanentError``.

    ``batch_size`` and ``amp`` (``[[models]]`` keys) override the default and the card."""
    path = Path(path)
    if not path.is_dir():
        raise CardError(f"model directory {path} does not exist")
    card = read_card(path / CARD_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise PermanentError(f"model {card.name}: TorchScript file {weights} does not exist")
    try:
        with warnings.catch_warnings():
            # torch 2.x deprecates TorchScript in favour of torch.export, but TorchScript is the
            # format user models ship in today; the warning would repeat on every worker start.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
            network = torch.jit.load(str(weights), map_location=device)  # type: ignore[no-untyped-call]
    except RuntimeError as exc:
        raise PermanentError(
            f"model {card.name}: {weights} is not a TorchScript file: {exc}"
        ) from None
    network.eval()
    return TorchScriptModel(card, network, device, file_digest(weights), batch_size=batch_size, amp=amp)


def user_model_factory(path: Path) -> ModelFactory:
    """A registry factory that loads the model directory ``path`` on the worker's device."""

    def factory(device: torch.device) -> Model:
        return load_user_model(path, device)

    return factory


#: How a ``[[models]]`` entry gives its model: a TorchScript folder, a MONAI bundle, nnU-Net.
KINDS = ("torchscript", "monai-bundle", "nnunet")


def configured_model_factory(
    kind: str, path: Path, *, name: str, version: str | None = None,
    labels: tuple[LabelOverride, ...] = (), **options: Any,
) -> ModelFactory:
    """The factory of one ``[[models]]`` entry; MONAI and nnU-Net load only when it is called.

    ``options`` are the kind's own keys: ``weights``, ``batch_size``, ``amp`` for a bundle;
    ``folds``, ``checkpoint``, ``orientation``, ``mirroring``, ``tile_step_size`` for nnU-Net;
    ``batch_size``, ``amp`` for a TorchScript folder.
    """
    if kind not in KINDS:
        raise PermanentError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")

    def factory(device: torch.device) -> Model:
        if kind == "monai-bundle":
            from inference.bundle import MonaiBundleModel

            return MonaiBundleModel(path, device, name=name, version=version, labels=labels, **options)
        if kind == "nnunet":
            from inference.nnunet import NnUNetModel

            return NnUNetModel(path, device, name=name, version=version, labels=labels, **options)
        return load_user_model(path, device, **options)

    return factory


def entry_point_factories() -> dict[str, ModelFactory]:
    """Model factories that installed packages publish in the ``dicom_node.models`` group.

    A plugin declares ``[project.entry-points."dicom_node.models"] my-model = "pkg.mod:MyModel"``
    where ``MyModel(device)`` builds a :class:`~inference.model.Model`.
    """
    factories: dict[str, ModelFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            factory = ep.load()
        except Exception as exc:
            raise PermanentError(
                f"model entry point {ep.name!r} ({ep.value}) cannot be loaded: {exc}"
            ) from exc
        if not callable(factory):
            raise PermanentError(f"model entry point {ep.name!r} ({ep.value}) is not callable")
        factories[ep.name] = factory
    return factories
