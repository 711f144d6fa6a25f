"""Key Object Selection (KOS) of a prediction: the key images, and the other results.

Document title "Of Interest" (DCM 113000), observer = the model as a device, a Key Object
Description with what the model reported, then references to the key images (each finding's
key slice; for a prediction without findings the largest section of each region, or the middle
slice) and to the SEG, SR, GSPS and secondary captures encoded with it.  PACS that list "key
images" take the radiologist to those slices; every referenced object is in the evidence.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from dicom_node.results import drawing
from dicom_node.results.common import contributing_equipment, fill_type2, lo, series_description
from dicom_node.results.context import EncodeContext

#: Results a KOS points at, in this order (those that were encoded in the same job).
REFERENCED_OUTPUTS = ("seg", "sr", "seg-resampled", "gsps", "sc")
#: Longest Key Object Description (a TEXT item is UT, viewers show about this much).
_DESCRIPTION_MAX = 1024


def key_slices(ctx: EncodeContext) -> list[int]:
    """Volume slices whose source images are flagged: findings' key slices, else regions'."""
    findings = [s for s in ctx.segments_with_voxels if drawing.is_finding(s)]
    if findings:
        picks = [drawing.key_slice(s) for s in findings]
    else:
        picks = [drawing.key_slice(s) for s in ctx.segments_with_voxels]
    return sorted(set(picks)) or [ctx.volume.shape[0] // 2]


def key_images(ctx: EncodeContext) -> list[Dataset]:
    """The source images of :func:`key_slices` (a multi-frame source once)."""
    images: dict[str, Dataset] = {}
    for k in key_slices(ctx):
        image, _ = ctx.frames.image_of_slice(k)
        images.setdefault(str(image.SOPInstanceUID), image)
    return list(images.values())


def encode(ctx: EncodeContext) -> list[Dataset]:
    """The ``kos`` output: one Key Object Selection Document."""
    prediction = ctx.prediction
    results = [ds for name in REFERENCED_OUTPUTS for ds in ctx.results.get(name, [])]
    referenced = [*key_images(ctx), *results]
    device = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uids.device,
            name=lo(prediction.model_name),
            manufacturer_name=lo(ctx.options.manufacturer),
            model_name=lo(f"{prediction.model_name} {prediction.model_version}"),
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=dcm_codes.DCM.OfInterest,
        referenced_objects=referenced,
        observer_device_context=device,
        description=drawing.summary_text(prediction)[:_DESCRIPTION_MAX],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=ctx.uids.series("kos"),
        series_number=ctx.options.series_number("kos"),
        sop_instance_uid=ctx.uids.instance("kos"),
        instance_number=1,
        manufacturer=lo(ctx.options.manufacturer),
        contributing_equipment=[contributing_equipment(prediction, ctx.options, ctx.uids.device)],
        series_description=series_description("KOS", prediction),
    )
    # All of the (cleaned) patient and study modules, as the other results have them.
    kos.copy_patient_and_study_information(ctx.frames.images[0])
    fill_type2(kos)
    return [kos]
