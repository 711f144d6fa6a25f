"""Secondary capture (SC) summary of a prediction: key slices drawn as RGB images.

A few images in a new series (each finding's key slice, else the largest section of each
region, else the middle slice; at most :data:`MAX_IMAGES`), each with

* a banner above the image: "AI result \N{EN DASH} <model> <version> \N{EN DASH} not for
  primary diagnosis";
* the slice in the results' window (:func:`dicom_node.results.drawing.window_for`), enlarged
  by a whole factor to at least :data:`MIN_SIZE` pixels, with the contours of every segment
  on it in its colour and each finding's outline, centre and name;
* a legend below the image with the measurements.

Burned In Annotation is YES; Pixel Spacing is the key slice's (divided by the enlargement).
Every viewer shows a secondary capture, so this is the fallback that is always seen.  The
text uses Pillow's bundled font, so the pixels are the same on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.results import drawing
from dicom_node.results.common import (
    contributing_equipment,
    copy_body_part,
    fill_type2,
    lo,
    series_description,
)
from dicom_node.results.context import EncodeContext
from inference.prediction import Prediction, Segment

EN_DASH = "\N{EN DASH}"
#: At most this many images per (series, model).
MAX_IMAGES = 4
#: Images are enlarged by a whole factor until their longer side has at least this many pixels.
MIN_SIZE = 512
#: Height of the banner band (pixels) and its text size.
BANNER_HEIGHT = 28
FONT_SIZE = 15
LINE_HEIGHT = 20
BANNER_COLOR = (255, 210, 0)
TEXT_COLOR = (255, 255, 255)
FINDING_COLOR = (255, 64, 64)
REGION_COLOR = (0, 200, 255)


def banner_text(prediction: Prediction) -> str:
    """The warning burned into every image."""
    return (
        f"AI result {EN_DASH} {prediction.model_name} {prediction.model_version} {EN_DASH} "
        "not for primary diagnosis"
    )


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def slices_to_render(prediction: Prediction, n_slices: int | None = None) -> list[int]:
    """The volume slices drawn: findings' key slices, else regions' largest sections, else the
    middle slice (needs ``n_slices`` or a segment to know the volume's depth)."""
    with_voxels = [s for s in prediction.segments if s.mask.any()]
    findings = [s for s in with_voxels if drawing.is_finding(s)]
    picks = [drawing.key_slice(s) for s in (findings or with_voxels)]
    unique = list(dict.fromkeys(picks))[:MAX_IMAGES]
    if unique:
        return unique
    depth = n_slices if n_slices is not None else (
        prediction.segments[0].mask.shape[0] if prediction.segments else 1
    )
    return [depth // 2]


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
    color: tuple[int, int, int], size: int = FONT_SIZE,
) -> None:
    """Text in Pillow's bundled font, with en dashes drawn as lines (the font has none)."""
    font = _font(size)
    x, y = xy
    for i, part in enumerate(text.split(EN_DASH)):
        if i:
            dash = font.getlength("n")
            mid = y + font.getbbox("n")[1] + (font.getbbox("n")[3] - font.getbbox("n")[1]) / 2.0
            draw.line([(x + 1, mid), (x + dash - 1, mid)], fill=color, width=max(1, size // 12))
            x += dash
        draw.text((x, y), part, fill=color, font=font)
        x += font.getlength(part)


def _grey(values: np.ndarray, window: drawing.Window) -> np.ndarray:
    low = window.center - window.width / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - low) / window.width
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _color(segment: Segment, default: tuple[int, int, int]) -> tuple[int, int, int]:
    return segment.label.color if segment.label.color is not None else default


def _draw_slice(
    ctx: EncodeContext, k: int, window: drawing.Window, scale: int
) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int]]]]:
    """Slice ``k`` enlarged, with contours and findings; and its legend lines."""
    grey = _grey(ctx.pixels[k], window)
    rows, cols = grey.shape
    image = Image.fromarray(grey, mode="L").resize(
        (cols * scale, rows * scale), Image.Resampling.BILINEAR
    ).convert("RGB")
    draw = ImageDraw.Draw(image)
    legend: list[tuple[str, tuple[int, int, int]]] = []
    for segment in ctx.segments_with_voxels:
        if not segment.mask[k].any():
            continue
        finding = drawing.is_finding(segment)
        color = _color(segment, FINDING_COLOR if finding else REGION_COLOR)
        outlines = (
            drawing.outline_on_slice(segment, ctx.volume, k)
            if finding
            else drawing.contours(segment.mask[k])
        )
        for xy in outlines:
            draw.line([(float(x) * scale, float(y) * scale) for x, y in xy], fill=color,
                      width=max(1, scale // 2))
        if finding:
            cx, cy = drawing.centre_on_slice(segment, ctx.volume, k) * scale
            r = 2 * scale
            draw.line([(cx - r, cy), (cx + r, cy)], fill=color, width=1)
            draw.line([(cx, cy - r), (cx, cy + r)], fill=color, width=1)
            top = np.vstack(outlines) * scale if outlines else np.array([[cx, cy]])
            draw_text(draw, (float(top[:, 0].max()) + 4, float(top[:, 1].min()) - 4),
                      segment.tracking_id, color)
            legend.append((drawing.finding_text(segment), color))
        else:
            legend.append((drawing.region_text(segment), color))
    if not legend:
        legend.append((drawing.summary_text(ctx.prediction), TEXT_COLOR))
    return image, legend


def render(ctx: EncodeContext, k: int, window: drawing.Window) -> tuple[np.ndarray, int]:
    """The RGB pixels of the summary image of slice ``k`` and the enlargement factor."""
    rows, cols = ctx.volume.shape[1:]
    scale = max(1, math.ceil(MIN_SIZE / max(rows, cols)))
    picture, legend = _draw_slice(ctx, k, window, scale)
    width = picture.width
    height = BANNER_HEIGHT + picture.height + LINE_HEIGHT * len(legend) + 8
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(picture, (0, BANNER_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw_text(draw, (6, (BANNER_HEIGHT - FONT_SIZE) // 2 - 1), banner_text(ctx.prediction),
              BANNER_COLOR)
    y = BANNER_HEIGHT + picture.height + 4
    for text, color in legend:
        draw_text(draw, (6, y), text, color)
        y += LINE_HEIGHT
    return np.asarray(canvas, dtype=np.uint8), scale


def _letter(direction: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(direction)))
    return ("L", "P", "H")[axis] if direction[axis] > 0 else ("R", "A", "F")[axis]


def patient_orientation(affine: np.ndarray) -> tuple[str, str]:
    """Patient Orientation of a slice image: where its rows and columns point (dominant axis)."""
    return (_letter(affine[:3, 2]), _letter(affine[:3, 1]))


def _pixel_spacing(image: Dataset, scale: int) -> tuple[float, float] | None:
    spacing = image.get("PixelSpacing")
    if spacing is None:
        measures = None
        for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            group = image.get(groups)
            if group and "PixelMeasuresSequence" in group[0]:
                measures = group[0].PixelMeasuresSequence[0]
                break
        spacing = measures.get("PixelSpacing") if measures is not None else None
    if spacing is None or len(spacing) != 2:
        return None
    return (round(float(spacing[0]) / scale, 6), round(float(spacing[1]) / scale, 6))


def encode(ctx: EncodeContext) -> list[Dataset]:
    """The ``sc`` output: one RGB secondary capture per key slice."""
    prediction = ctx.prediction
    slices = slices_to_render(prediction, ctx.volume.shape[0])
    window = drawing.window_for(
        prediction, ctx.volume.modality, ctx.frames.images[0], ctx.pixels, slices
    )
    out: list[Dataset] = []
    for number, k in enumerate(slices, start=1):
        source, frame = ctx.frames.image_of_slice(k)
        pixels, scale = render(ctx, k, window)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=ctx.uids.series("sc"),
            series_number=ctx.options.series_number("sc"),
            sop_instance_uid=ctx.uids.instance("sc", str(number)),
            instance_number=number,
            manufacturer=lo(ctx.options.manufacturer),
            pixel_spacing=_pixel_spacing(source, scale),  # type: ignore[arg-type]
            patient_orientation=patient_orientation(ctx.volume.affine),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[
                contributing_equipment(prediction, ctx.options, ctx.uids.device)
            ],
            series_description=series_description("SC", prediction),
        )
        _describe(sc, source, frame, prediction, ctx.uids.device, ctx.options.software_version)
        out.append(sc)
    return out


def _describe(
    sc: hd.sc.SCImage, source: Dataset, frame: int | None, prediction: Prediction, device: str,
    software_version: str,
) -> None:
    # All of the (cleaned) patient and study modules, as the other results have them
    # (from_ref_dataset copies only names, IDs, dates and sex).
    sc.copy_patient_and_study_information(source)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ManufacturerModelName = lo(prediction.model_name)
    sc.SoftwareVersions = lo(software_version)
    sc.DeviceSerialNumber = device
    sc.DeviceUID = device
    # The banner with ASCII hyphens: the character set of the source may lack the en dash.
    sc.DerivationDescription = lo(banner_text(prediction).replace(EN_DASH, "-"))
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        reference.ReferencedFrameNumber = frame
    sc.SourceImageSequence = [reference]
    copy_body_part(sc, source)
    fill_type2(sc)


__all__: Sequence[str] = ["banner_text", "encode", "render", "slices_to_render"]
