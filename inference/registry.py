"""Model registry: name -> factory.  Built-ins register here; user models come from config."""

from __future__ import annotations

from collections.abc import Callable

import torch

from inference.errors import PermanentError
from inference.model import Model

ModelFactory = Callable[[torch.device], Model]


def select_device(preference: str = "auto") -> torch.device:
    """Resolve ``"auto"`` to CUDA when available, else CPU; pass other names through."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def builtin_factories() -> dict[str, ModelFactory]:
    """The models that ship with dicom-node, by name (one entry per model class)."""
    # Imported on call: the model modules load only in processes that build models.
    from inference.models.ct_tissue import CtTissueModel
    from inference.models.foreground import ForegroundModel
    from inference.models.lung_nodules import LungNoduleModel

    return {
        CtTissueModel.name: CtTissueModel,
        ForegroundModel.name: ForegroundModel,
        LungNoduleModel.name: LungNoduleModel,
    }


class ModelRegistry:
    """Creates each model once and hands the same instance back (one per worker process)."""

    def __init__(self, device: torch.device, factories: dict[str, ModelFactory] | None = None):
        self.device = device
        self._factories = dict(builtin_factories() if factories is None else factories)
        self._loaded: dict[str, Model] = {}

    def register(self, name: str, factory: ModelFactory) -> None:
        """Add (or replace) the factory of model ``name``; it is created on first :meth:`get`."""
        self._factories[name] = factory

    @property
    def names(self) -> list[str]:
        """Names of every model this registry can create, sorted."""
        return sorted(self._factories)

    def get(self, name: str) -> Model:
        """The model ``name`` on this registry's device, created on first use then reused."""
        if name not in self._loaded:
            try:
                factory = self._factories[name]
            except KeyError:
                raise PermanentError(
                    f"unknown model {name!r}; known models: {', '.join(self.names) or 'none'}"
                ) from None
            self._loaded[name] = factory(self.device)
        return self._loaded[name]
