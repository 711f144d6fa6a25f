"""Model registry: name -> factory.  Built-ins register here; user models come from config.

A worker process keeps the models it created *warm* (in memory, on their device) in a
least-recently-used cache of at most ``max_warm`` models (``[worker] max_warm_models``): the
model a job needs is taken from the cache, or created (cold start) after the least recently
used models beyond the cap were dropped and the device's cached memory given back.  So a GPU
worker serving many rules holds the weights of the few models its traffic uses, not of all.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inference.errors import PermanentError
from inference.gpu import free_device_memory, resolve_device
from inference.model import Model

ModelFactory = Callable[[torch.device], Model]

#: Warm models a worker process keeps when nothing says otherwise.
DEFAULT_MAX_WARM = 2


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


@dataclass(frozen=True)
class WarmModel:
    """A model held in memory by this process (what the worker heartbeat reports)."""

    name: str
    version: str
    device: str
    loaded_at: float
    last_used: float
    load_s: float
    uses: int

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "device": self.device,
                "loaded_at": self.loaded_at, "last_used": self.last_used,
                "load_s": self.load_s, "uses": self.uses}


class ModelRegistry:
    """Creates models on demand and keeps the ``max_warm`` most recently used ones warm.

    ``devices`` gives a model its own device (``"cpu"``, ``"cuda:1"``...); the others run on
    the registry's ``device``.
    """

    def __init__(
        self,
        device: torch.device,
        factories: dict[str, ModelFactory] | None = None,
        *,
        max_warm: int = DEFAULT_MAX_WARM,
    ):
        if max_warm < 1:
            raise ValueError(f"max_warm must be at least 1, got {max_warm}")
        self.device = device
        self.max_warm = max_warm
        self._factories = dict(builtin_factories() if factories is None else factories)
        self._devices: dict[str, str] = {}
        # Least recently used first.
        self._loaded: OrderedDict[str, Model] = OrderedDict()
        self._info: dict[str, WarmModel] = {}
        self._lock = threading.RLock()
        # What :meth:`warm` answers, replaced (never mutated) under the lock: readers such as
        # the heartbeat thread must not wait for a model that takes a minute to load.
        self._snapshot: tuple[WarmModel, ...] = ()
        #: Names evicted so far, oldest first (the worker logs them; inference logs nothing).
        self.evicted: list[str] = []

    def register(self, name: str, factory: ModelFactory, *, device: str = "auto") -> None:
        """Add (or replace) the factory of model ``name``; it is created on first :meth:`get`.

        ``device`` other than ``"auto"`` pins the model to that device.
        """
        with self._lock:
            self._factories[name] = factory
            if device == "auto":
                self._devices.pop(name, None)
            else:
                self._devices[name] = device

    @property
    def names(self) -> list[str]:
        """Names of every model this registry can create, sorted."""
        return sorted(self._factories)

    def device_for(self, name: str) -> torch.device:
        """The device model ``name`` runs on (raises ``PermanentError`` if the worker lacks it)."""
        preference = self._devices.get(name)
        return self.device if preference is None else resolve_device(preference)

    def get(self, name: str) -> Model:
        """The model ``name``, warm if it is, else created now (evicting beyond the cap)."""
        with self._lock:
            model = self._loaded.get(name)
            now = time.time()
            if model is not None:
                self._loaded.move_to_end(name)
                info = self._info[name]
                self._info[name] = WarmModel(info.name, info.version, info.device, info.loaded_at, now,
                                             info.load_s, info.uses + 1)
                self._publish()
                return model
            try:
                factory = self._factories[name]
            except KeyError:
                raise PermanentError(
                    f"unknown model {name!r}; known models: {', '.join(self.names) or 'none'}"
                ) from None
            device = self.device_for(name)
            # Make room first: the new weights may need the memory the old ones hold.
            self._evict(keep=self.max_warm - 1)
            self._publish()
            started = time.perf_counter()
            model = factory(device)
            load_s = time.perf_counter() - started
            self._loaded[name] = model
            self._info[name] = WarmModel(name, str(getattr(model, "version", "")), str(device), now, now,
                                         round(load_s, 3), 1)
            self._publish()
            return model

    def _evict(self, *, keep: int) -> None:
        devices = set()
        while len(self._loaded) > keep:
            name, _model = self._loaded.popitem(last=False)
            info = self._info.pop(name)
            devices.add(info.device)
            self.evicted.append(name)
            del _model
        if devices:
            gc.collect()  # drop the evicted networks' tensors before the allocator's cache
            for device in devices:
                free_device_memory(torch.device(device))

    def _publish(self) -> None:
        self._snapshot = tuple(self._info[name] for name in self._loaded)

    def warm(self) -> list[WarmModel]:
        """The models this process holds, least recently used first (without waiting for a
        model being loaded)."""
        return list(self._snapshot)

    def is_warm(self, name: str) -> bool:
        """Whether ``name`` is in memory now (its next job starts without loading it)."""
        return any(w.name == name for w in self._snapshot)
