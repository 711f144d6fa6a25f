"""Result encoders: a :class:`~inference.prediction.Prediction` as DICOM objects.

The output types (SEG, TID 1500 SR, GSPS, KOS, secondary capture) are a registry
(:mod:`dicom_node.results.registry`); :func:`encode_outputs` encodes the ones asked for and
:func:`encode_results` the SEG + SR pair.  Every UID derives from (source series, model name,
model version, output type), so a retried job produces the same identities and an archive
replaces instead of duplicating.  See ``docs/results.md`` for what the objects contain.

The encoders are imported on first use: the registry's names (settings validation) come
without highdicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.results.common import ResultEncodingError, ResultOptions, ResultUIDs
    from dicom_node.results.encode import (
        EncodedResults,
        encode_outputs,
        encode_results,
        rendered_slices,
    )

__all__ = [
    "EncodedResults",
    "ResultEncodingError",
    "ResultOptions",
    "ResultUIDs",
    "encode_outputs",
    "encode_results",
    "rendered_slices",
]

_HOME = {
    "EncodedResults": "dicom_node.results.encode",
    "encode_outputs": "dicom_node.results.encode",
    "encode_results": "dicom_node.results.encode",
    "rendered_slices": "dicom_node.results.encode",
    "ResultEncodingError": "dicom_node.results.common",
    "ResultOptions": "dicom_node.results.common",
    "ResultUIDs": "dicom_node.results.common",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
