"""Grayscale Softcopy Presentation State (GSPS) of a prediction: the results drawn on the images.

One presentation state per (source series, model), referencing every source image, with one
graphic layer named for the model.  On each finding's key slice: its outline (closed POLYLINE),
its centre (POINT) and a text with its measurements ("Nodule 1: 12.4 mm, 0.8 ml, confidence
71 %"); on a few representative slices of each region: its contours and its volume.  A
prediction with nothing to draw gets a text on the middle slice saying so.  The VOI window
suits the modality (:func:`dicom_node.results.drawing.window_for`).  PACS viewers that show
neither SEG nor SR apply a GSPS (and DCMTK's ``dcmp2pgm`` renders it).
"""

from __future__ import annotations

import re
from collections import defaultdict

import highdicom as hd
import numpy as np
import structlog
from pydicom.dataset import Dataset

from dicom_node.results import drawing
from dicom_node.results.common import (
    ResultEncodingError,
    contributing_equipment,
    copy_body_part,
    fill_type2,
    lo,
    series_description,
)
from dicom_node.results.context import EncodeContext
from inference.prediction import Segment

log = structlog.get_logger(__name__)

#: Display colour of the layer (yellow, as CIELab), for viewers that colour graphics by layer.
_LAYER_COLOR = (255, 255, 0)


def layer_name(model_name: str) -> str:
    """The graphic layer of a model: a CS value (16 characters of A-Z, 0-9, space, underscore)."""
    name = re.sub(r"[^A-Z0-9 _]", "_", f"AI {model_name}".upper())
    return name[:16].rstrip() or "AI"


def _pixel_point(xy: np.ndarray, rows: int, cols: int) -> np.ndarray:
    # Keep graphics inside the image area (a centre on the border would be refused).
    return np.asarray(np.clip(xy, [0.0, 0.0], [float(cols), float(rows)]))


def _graphic(kind: hd.pr.GraphicTypeValues, xy: np.ndarray, segment: Segment, ctx: EncodeContext
             ) -> hd.pr.GraphicObject:
    """A graphic in PIXEL units, tracked as the segment (same Tracking UID as in SEG and SR)."""
    first = ctx.frames.images[0]
    return hd.pr.GraphicObject(
        graphic_type=kind,
        graphic_data=_pixel_point(xy, int(first.Rows), int(first.Columns)),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        tracking_id=lo(segment.tracking_id),
        tracking_uid=ctx.uids.tracking(segment.tracking_id),
    )


def _text_anchor(points: np.ndarray, rows: int, cols: int) -> tuple[float, float]:
    """Above-right of the outline, inside the image."""
    x = float(min(points[:, 0].max() + 2.0, cols - 1.0))
    y = float(max(points[:, 1].min() - 2.0, 1.0))
    return (x, y)


def _graphics(ctx: EncodeContext) -> dict[int, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]]:
    """Per volume slice: the graphic and text objects drawn on its source image."""
    first = ctx.frames.images[0]
    rows, cols = int(first.Rows), int(first.Columns)
    drawn: dict[int, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]] = defaultdict(
        lambda: ([], [])
    )
    pixel = hd.pr.AnnotationUnitsValues.PIXEL
    for segment in ctx.segments_with_voxels:
        if drawing.is_finding(segment):
            k = drawing.key_slice(segment)
            graphics, texts = drawn[k]
            outlines = drawing.outline_on_slice(segment, ctx.volume, k)
            for xy in outlines:
                graphics.append(
                    _graphic(hd.pr.GraphicTypeValues.POLYLINE, xy, segment, ctx)
                )
            centre = _pixel_point(drawing.centre_on_slice(segment, ctx.volume, k)[None, :], rows, cols)
            graphics.append(
                _graphic(hd.pr.GraphicTypeValues.POINT, centre, segment, ctx)
            )
            around = np.vstack(outlines) if outlines else centre
            texts.append(
                hd.pr.TextObject(
                    text_value=drawing.finding_text(segment)[:1024],
                    units=pixel,
                    anchor_point=_text_anchor(around, rows, cols),
                    anchor_point_visible=False,
                    text_justification=hd.pr.TextJustificationValues.LEFT,
                )
            )
            continue
        for k in drawing.region_slices(segment):
            graphics, texts = drawn[k]
            outlines = drawing.contours(segment.mask[k])
            for xy in outlines:
                graphics.append(
                    _graphic(hd.pr.GraphicTypeValues.POLYLINE, xy, segment, ctx)
                )
            if outlines:
                texts.append(
                    hd.pr.TextObject(
                        text_value=drawing.region_text(segment)[:1024],
                        units=pixel,
                        anchor_point=_text_anchor(np.vstack(outlines), rows, cols),
                        anchor_point_visible=False,
                        text_justification=hd.pr.TextJustificationValues.LEFT,
                    )
                )
    if not drawn:
        k = ctx.volume.shape[0] // 2
        drawn[k][1].append(
            hd.pr.TextObject(
                text_value=drawing.summary_text(ctx.prediction)[:1024],
                units=pixel,
                anchor_point=(2.0, 2.0),
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    return dict(drawn)


def _rescale(image: Dataset) -> tuple[str, str, str]:
    return tuple(  # type: ignore[return-value]
        str(image.get(k, "")) for k in ("RescaleSlope", "RescaleIntercept", "RescaleType")
    )


def encode(ctx: EncodeContext) -> list[Dataset]:
    """The ``gsps`` output: one presentation state over the whole source series.

    A presentation state has one Modality LUT: a series whose images differ in rescale slope
    or intercept gets one state per rescale group (the group of the first image keeps the
    plain instance UID), each drawing on its own images.  A multi-frame source with per-frame
    rescale gets none (logged).
    """
    prediction, frames = ctx.prediction, ctx.frames
    layer = hd.pr.GraphicLayer(
        layer_name=layer_name(prediction.model_name),
        order=1,
        description=lo(f"AI result {prediction.model_name} {prediction.model_version}"),
        display_color=hd.color.CIELabColor.from_rgb(*_LAYER_COLOR),
    )
    graphics = _graphics(ctx)
    drawn = [k for k in sorted(graphics) if k in ctx.pixels][:8]
    window = drawing.window_for(prediction, ctx.volume.modality, frames.images[0], ctx.pixels, drawn)
    groups: dict[tuple[str, str, str], list[int]] = {}
    for index, image in enumerate(frames.images):
        groups.setdefault(_rescale(image), []).append(index)
    out: list[Dataset] = []
    for number, members in enumerate(groups.values(), start=1):
        images = [frames.images[i] for i in members]
        uids = {str(im.SOPInstanceUID) for im in images}
        annotations = []
        for k, (objects, texts) in sorted(graphics.items()):
            image, frame = frames.image_of_slice(k)
            if str(image.SOPInstanceUID) not in uids:
                continue
            annotations.append(
                hd.pr.GraphicAnnotation(
                    referenced_images=[image],
                    graphic_layer=layer,
                    referenced_frame_number=frame,
                    graphic_objects=objects or None,
                    text_objects=texts or None,
                )
            )
        try:
            gsps = _state(ctx, images, annotations, layer, window, number)
        except ValueError as exc:
            if frames.multiframe:
                # A library's text is not logged (house rule); the cause is the per-frame rescale.
                log.warning("gsps_skipped", reason="per-frame rescale in a multi-frame source")
                return []
            raise ResultEncodingError(f"GSPS: {exc}") from exc
        out.append(gsps)
    return out


def _state(
    ctx: EncodeContext,
    images: list[Dataset],
    annotations: list[hd.pr.GraphicAnnotation],
    layer: hd.pr.GraphicLayer,
    window: drawing.Window,
    number: int,
) -> Dataset:
    prediction = ctx.prediction
    voi = hd.pr.SoftcopyVOILUTTransformation(
        window_center=window.center,
        window_width=window.width,
        window_explanation=window.explanation,
    )
    parts = () if number == 1 else (str(number),)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=ctx.uids.series("gsps"),
        series_number=ctx.options.series_number("gsps"),
        sop_instance_uid=ctx.uids.instance("gsps", *parts),
        instance_number=number,
        manufacturer=lo(ctx.options.manufacturer),
        manufacturer_model_name=lo(prediction.model_name),
        software_versions=lo(ctx.options.software_version),
        device_serial_number=ctx.uids.device,
        content_label="AI_RESULT",
        content_description=lo(f"{prediction.model_name} {prediction.model_version}"),
        graphic_annotations=annotations or None,
        graphic_layers=[layer] if annotations else None,
        voi_lut_transformations=[voi],
        contributing_equipment=[contributing_equipment(prediction, ctx.options, ctx.uids.device)],
        series_description=series_description("GSPS", prediction),
    )
    # highdicom 0.28 stores a one-window explanation as a list of its characters ("L\\U\\N\\G").
    gsps.SoftcopyVOILUTSequence[0].WindowCenterWidthExplanation = window.explanation
    gsps.DeviceUID = ctx.uids.device
    copy_body_part(gsps, images[0])
    fill_type2(gsps)
    return gsps
