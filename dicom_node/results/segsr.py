"""The ``seg`` and ``sr`` output types: the DICOM SEG and the TID 1500 SR of a prediction."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_node.results.context import EncodeContext
from dicom_node.results.seg import encode_seg
from dicom_node.results.sr import encode_sr


def encode_seg_output(ctx: EncodeContext) -> list[Dataset]:
    """The ``seg`` output: one SEG of the segments with voxels, none without."""
    segments = ctx.segments_with_voxels
    if not segments:
        return []
    return [encode_seg(ctx.prediction, segments, ctx.frames, ctx.uids, ctx.options)]


def encode_sr_output(ctx: EncodeContext) -> list[Dataset]:
    """The ``sr`` output: the TID 1500 report, referencing the SEG's segments."""
    seg = ctx.one("seg")
    return [
        encode_sr(
            ctx.prediction, ctx.volume, ctx.frames, seg, ctx.segment_numbers, ctx.uids, ctx.options
        )
    ]
