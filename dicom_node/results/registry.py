"""Output types: name -> encoder of a prediction into DICOM objects, one registration line each.

An encoder takes an :class:`EncodeContext` (the prediction, the volume's geometry, the source
headers, the derived UIDs and the objects encoded so far) and returns its datasets (maybe none:
no SEG for a prediction without a voxel).  Encoders are imported on first use (each
registration names a small function that imports its module), so reading the names (settings
validation) does not load highdicom.

Adding an output type: write ``dicom_node/results/<name>.py`` with an ``encode(ctx)`` function,
and below, its two-line loader and one :func:`register` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicom_node.results.context import EncodeContext

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["EncodeContext", "OutputType", "closure", "output_names", "output_type", "register"]


Encoder = Callable[[EncodeContext], list["Dataset"]]


@dataclass(frozen=True)
class OutputType:
    """One kind of result object."""

    name: str
    #: The encoder (a loader that imports its module on first use).
    encoder: Encoder
    #: SOP Class UIDs of its objects (delivery negotiates them).
    sop_class_uids: tuple[str, ...]
    #: What a viewer shows of it (docs, ``config check``).
    description: str
    #: Output types encoded (not necessarily delivered) whenever this one is: objects it refers to.
    needs: tuple[str, ...] = ()


_TYPES: dict[str, OutputType] = {}


def register(output: OutputType) -> None:
    """Add an output type; it is encoded after every type registered before it."""
    if output.name in _TYPES:
        raise ValueError(f"output type {output.name!r} is registered twice")
    unknown = [n for n in output.needs if n not in _TYPES]
    if unknown:
        raise ValueError(f"output type {output.name!r} needs {unknown}, not registered before it")
    _TYPES[output.name] = output


def output_names() -> list[str]:
    """Every output type, in encoding order."""
    return list(_TYPES)


def output_type(name: str) -> OutputType:
    """The output type ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _TYPES[name]
    except KeyError:
        raise KeyError(f"unknown output type {name!r}; known: {', '.join(_TYPES)}") from None


def closure(names: Iterable[str]) -> list[str]:
    """``names`` plus what they need, in encoding order."""
    wanted = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(output_type(name).needs)
    return [n for n in _TYPES if n in wanted]


SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

def _seg(ctx: EncodeContext) -> list[Dataset]:
    from dicom_node.results.segsr import encode_seg_output

    return encode_seg_output(ctx)


def _seg_resampled(ctx: EncodeContext) -> list[Dataset]:
    from dicom_node.results import resampled

    return resampled.encode(ctx)


def _sr(ctx: EncodeContext) -> list[Dataset]:
    from dicom_node.results.segsr import encode_sr_output

    return encode_sr_output(ctx)


def _gsps(ctx: EncodeContext) -> list[Dataset]:
    from dicom_node.results import gsps

    return gsps.encode(ctx)


def _sc(ctx: EncodeContext) -> list[Dataset]:
    from dicom_node.results import sc

    return sc.encode(ctx)


def _kos(ctx: EncodeContext) -> list[Dataset]:
    from dicom_node.results import kos

    return kos.encode(ctx)


register(OutputType("seg", _seg, (SEGMENTATION,),
                    "Segmentation: the masks, overlaid by OHIF, 3D Slicer, Cornerstone viewers"))
register(OutputType("sr", _sr, (COMPREHENSIVE_3D_SR,),
                    "TID 1500 Measurement Report referencing the SEG segments", needs=("seg",)))
register(OutputType("seg-resampled", _seg_resampled, (SEGMENTATION,),
                    "Segmentation of a gantry-tilted stack on an orthogonal grid (dcmqi, 3D Slicer); "
                    "none for an untilted stack, whose seg already is"))
register(OutputType("gsps", _gsps, (GSPS,),
                    "Presentation state: outlines, centres and measurements drawn on the images"))
register(OutputType("sc", _sc, (SECONDARY_CAPTURE,),
                    "Secondary capture: key slices with contours, legend and an AI banner"))
register(OutputType("kos", _kos, (KEY_OBJECT_SELECTION,),
                    "Key Object Selection: the key images, referencing the other results"))

#: What a destination receives when its ``outputs`` are not configured: every type, so every
#: viewer family shows something (SEG/SR for OHIF and Slicer, GSPS/KOS/SC for PACS viewers).
DEFAULT_OUTPUTS: tuple[str, ...] = ("seg", "sr", "gsps", "kos", "sc")
