"""The contract every model meets, built-in or user-supplied."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from inference.prediction import Label, Prediction
from inference.volume import Volume


@runtime_checkable
class Model(Protocol):
    """A model turns a :class:`Volume` into a :class:`Prediction`.

    A model is created once per worker process (after fork) on the device the worker chose
    and reused for every job; it never picks its own device.
    """

    name: str
    version: str
    #: DICOM modalities the model accepts (``{"CT"}``); empty means any.
    modalities: frozenset[str]
    labels: tuple[Label, ...]

    def predict(self, volume: Volume) -> Prediction:
        """Run on one volume; raise ``inference.PermanentError`` for unusable input."""
        ...
