"""The files of the model formats the node loads, read without torch, MONAI or nnU-Net.

The workers' loaders (:mod:`inference.bundle`, :mod:`inference.nnunet`,
:mod:`inference.user_models`) and ``/api/models`` (a web process may have no torch) share them.
"""

from __future__ import annotations

import ast
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.errors import PermanentError
from inference.identity import file_digest, weights_digest

Fold = int | Literal["all"]
#: Entry-point group of model plugins (see ``inference.user_models.entry_point_factories``).
ENTRY_POINT_GROUP = "dicom_node.models"
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PT": "PT", "PET": "PT", "US": "US", "CR": "CR", "DX": "DX"}


# -- MONAI bundles --------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleFiles:
    """The files of a bundle folder that the node reads."""

    root: Path
    metadata: Path
    config: Path
    weights: Path

    @property
    def torchscript(self) -> bool:
        return self.weights.suffix == ".ts"


def bundle_files(root: Path, weights: str | None = None) -> BundleFiles:
    """Find ``configs/metadata.json``, the inference config and the weights; raise
    :class:`PermanentError` naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise PermanentError(f"MONAI bundle folder {root} does not exist")
    metadata = root / "configs" / "metadata.json"
    if not metadata.is_file():
        raise PermanentError(f"MONAI bundle {root}: configs/metadata.json does not exist")
    config = next((root / "configs" / n for n in _CONFIG_NAMES if (root / "configs" / n).is_file()), None)
    if config is None:
        raise PermanentError(f"MONAI bundle {root}: configs/inference.json (or .yaml) does not exist")
    names = (weights,) if weights is not None else ("model.pt", "model.ts")
    chosen = next((root / "models" / n for n in names if (root / "models" / n).is_file()), None)
    if chosen is None:
        raise PermanentError(f"MONAI bundle {root}: {' or '.join('models/' + n for n in names)} does not exist")
    return BundleFiles(root, metadata, config, chosen)


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PermanentError(f"MONAI bundle metadata {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise PermanentError(f"MONAI bundle metadata {path} is not a JSON object")
    return data


def _network_data_format(meta: dict[str, Any], side: str) -> dict[str, Any]:
    fmt = meta.get("network_data_format") or {}
    entries = fmt.get(side) or {}
    key = "pred" if side == "outputs" else "image"
    if not isinstance(entries, dict) or not entries:
        return {}
    entry = entries.get(key) or next(iter(entries.values()))
    return entry if isinstance(entry, dict) else {}


def bundle_label_names(meta: dict[str, Any]) -> dict[int, str]:
    """The bundle's output ``channel_def`` as index -> name (empty when it has none)."""
    channel_def = _network_data_format(meta, "outputs").get("channel_def") or {}
    out: dict[int, str] = {}
    for key, name in channel_def.items():
        try:
            out[int(key)] = str(name)
        except ValueError:
            raise PermanentError(f"MONAI bundle channel_def key {key!r} is not an integer") from None
    return out


def bundle_modalities(meta: dict[str, Any]) -> frozenset[str]:
    """DICOM modality the bundle's input declares (``modality`` of the image input), if any."""
    raw = _network_data_format(meta, "inputs").get("modality")
    if isinstance(raw, str) and raw.upper() in _DICOM_MODALITIES:
        return frozenset({_DICOM_MODALITIES[raw.upper()]})
    return frozenset()


def bundle_version(meta: dict[str, Any]) -> str:
    version = meta.get("version")
    return str(version) if version else "0"


def describe_bundle(root: Path, weights: str | None = None) -> dict[str, Any]:
    """Version, digest, modalities and label names of a bundle, without loading MONAI or torch."""
    files = bundle_files(root, weights)
    meta = read_metadata(files.metadata)
    return {
        "version": bundle_version(meta),
        "digest": weights_digest([files.weights]),
        "weights": str(files.weights),
        "modalities": sorted(bundle_modalities(meta)),
        "labels": {str(k): v for k, v in sorted(bundle_label_names(meta).items())},
    }


# -- nnU-Net v2 result folders --------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PermanentError(f"nnU-Net folder {path.parent}: {path.name} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PermanentError(f"nnU-Net file {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise PermanentError(f"nnU-Net file {path} is not a JSON object")
    return data


def available_folds(root: Path, checkpoint: str) -> list[Fold]:
    """Folds with the checkpoint file, as nnU-Net numbers them (``fold_all`` -> ``"all"``)."""
    folds: list[Fold] = []
    for sub in sorted(root.glob("fold_*")):
        if (sub / checkpoint).is_file():
            tag = sub.name[len("fold_"):]
            folds.append("all" if tag == "all" else int(tag) if tag.isdigit() else -1)
    return sorted((f for f in folds if f != -1), key=lambda f: (f == "all", str(f)))


def checkpoint_paths(root: Path, folds: Sequence[Fold] | None, checkpoint: str) -> tuple[list[Fold], list[Path]]:
    """The folds to use (given, or every fold that has ``checkpoint``) and their files."""
    root = Path(root)
    if not root.is_dir():
        raise PermanentError(f"nnU-Net folder {root} does not exist")
    chosen = list(folds) if folds else available_folds(root, checkpoint)
    if not chosen:
        raise PermanentError(f"nnU-Net folder {root} has no fold_*/{checkpoint}")
    paths = [root / f"fold_{f}" / checkpoint for f in chosen]
    missing = [str(p.relative_to(root)) for p in paths if not p.is_file()]
    if missing:
        raise PermanentError(f"nnU-Net folder {root}: {', '.join(missing)} does not exist")
    return chosen, paths


def nnunet_label_names(dataset: dict[str, Any], where: Path) -> dict[int, str]:
    """``dataset.json`` labels as index -> name; region-based labels are refused."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise PermanentError(f"nnU-Net folder {where}: dataset.json has no 'labels'")
    out: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise PermanentError(
                f"nnU-Net folder {where}: label {name!r} is region-based ({value!r}); only integer labels are supported"
            )
        out[value] = str(name)
    return out


def dataset_modalities(dataset: dict[str, Any], where: Path) -> frozenset[str]:
    """``{"CT"}`` for a CT model (``channel_names`` ``{"0": "CT"}``), else any modality; a model
    with several input channels is refused (a series is one volume)."""
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if not isinstance(channels, dict) or len(channels) != 1:
        raise PermanentError(
            f"nnU-Net folder {where}: dataset.json must name exactly one input channel, got {channels!r}"
        )
    (only,) = channels.values()
    return frozenset({"CT"}) if str(only).upper() == "CT" else frozenset()


def describe_nnunet(
    root: Path, folds: Sequence[Fold] | None = None, checkpoint: str = "checkpoint_final.pth"
) -> dict[str, Any]:
    """Digest, folds and label names of a result folder, without loading nnU-Net or torch."""
    chosen, paths = checkpoint_paths(Path(root), folds, checkpoint)
    dataset = read_json(Path(root) / "dataset.json")
    digest = weights_digest(paths)
    return {
        "version": f"sha256-{digest[:12]}",
        "digest": digest,
        "folds": [str(f) for f in chosen],
        "labels": {str(k): v for k, v in sorted(nnunet_label_names(dataset, Path(root)).items())},
    }


# -- TorchScript folders and the [[models]] entries -----------------------------------------


def describe_torchscript(path: Path) -> dict[str, Any]:
    """Version (from ``model.toml``) and digest of ``model.pt`` of a TorchScript model folder."""
    card = Path(path) / "model.toml"
    try:
        data = tomllib.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PermanentError(f"model card {card} cannot be read: {exc}") from None
    weights = Path(path) / "model.pt"
    return {"version": str(data.get("version", "")), "digest": file_digest(weights), "weights": str(weights)}


def describe_configured(kind: str, path: Path, *, version: str | None = None, **options: Any) -> dict[str, Any]:
    """Version and weights digest of a ``[[models]]`` entry, read from its files without
    loading a network (for ``/api/models``)."""
    info: dict[str, Any]
    if kind == "monai-bundle":
        info = describe_bundle(path, options.get("weights"))
    elif kind == "nnunet":
        info = describe_nnunet(path, options.get("folds"), options.get("checkpoint", "checkpoint_final.pth"))
    else:
        info = describe_torchscript(Path(path))
    if version:
        info["version"] = version
    return info


def builtin_descriptions() -> dict[str, str]:
    """Name -> version of the built-in models (``inference/models/*.py``), read from their source.

    The model modules import torch; a web host answering ``/api/models`` may have none (and
    should not load 300 MB for a list), so the classes' ``name`` / ``version`` constants are
    read with :mod:`ast`.  ``tests/unit/test_model_formats.py`` checks the result equals the
    registry's classes.
    """
    out: dict[str, str] = {}
    for path in sorted(Path(__file__).with_name("models").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            consts: dict[str, object] = {}
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                    consts.update({t.id: stmt.value.value for t in stmt.targets if isinstance(t, ast.Name)})
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                        and isinstance(stmt.value, ast.Constant):
                    consts[stmt.target.id] = stmt.value.value
            has_predict = any(isinstance(s, ast.FunctionDef) and s.name == "predict" for s in node.body)
            name, version = consts.get("name"), consts.get("version")
            if has_predict and isinstance(name, str) and isinstance(version, str):
                out[name] = version
    return out
