"""What the configuration check asks of the models without running them: which names exist and
which modalities each accepts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from inference.errors import PermanentError
from inference.formats import bundle_files, bundle_modalities, dataset_modalities, read_json, read_metadata
from inference.registry import builtin_factories
from inference.user_models import CARD_NAME, CardError, read_card


def accepted_modalities(
    user_models: Mapping[str, Path], framework_models: Mapping[str, tuple[str, Path]] | None = None
) -> dict[str, frozenset[str] | None]:
    """Every model name the workers can build (built-ins, entry points, ``user_models`` by name ->
    folder, ``framework_models`` by name -> (``"monai-bundle"`` or ``"nnunet"``, folder)) with
    the modalities it accepts: an empty set accepts any, None is unknown without loading the
    model (entry points).

    Raises
    ------
    inference.user_models.CardError
        When a user model's card is missing or invalid.
    """
    from inference.user_models import entry_point_factories

    found: dict[str, frozenset[str] | None] = {
        name: frozenset(factory(torch.device("cpu")).modalities) for name, factory in builtin_factories().items()
    }
    for name in entry_point_factories():
        found.setdefault(name, None)
    for name, folder in user_models.items():
        found[name] = read_card(Path(folder) / CARD_NAME).modalities
    for name, (kind, folder) in (framework_models or {}).items():
        try:
            if kind == "monai-bundle":
                found[name] = bundle_modalities(read_metadata(bundle_files(Path(folder)).metadata))
            else:
                found[name] = dataset_modalities(read_json(Path(folder) / "dataset.json"), Path(folder))
        except PermanentError as exc:
            # metadata.json / dataset.json are these models' cards.
            raise CardError(f"model {name}: {exc}") from None
    return found
