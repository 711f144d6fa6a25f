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

_ENCODE = {"EncodedResults", "encode_outputs", "encode_results", "rendered_slices"}
_COMMON = {"ResultEncodingError", "ResultOptions", "ResultUIDs"}


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562), by plain import statements the import contracts see.
    if name in _ENCODE:
        from dicom_node.results import encode

        return getattr(encode, name)
    if name in _COMMON:
        from dicom_node.results import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
