"""Labels of models that come with only label names (MONAI bundles, nnU-Net ``dataset.json``).

Such models name their classes (``{"1": "spleen"}``) but give no codes.  A SEG segment needs a
category and a type code: :func:`label_for_name` finds SNOMED CT codes for common anatomy
(DICOM CID 7166 / 7151 spellings), and a model's configuration can give codes per label
(:class:`LabelOverride`), which always win.  A name we do not know gets the category
"Anatomical Structure" and a type in the local coding scheme ``99DICOMNODE`` (PS3.16 lets
private schemes start with ``99``), whose meaning is the label name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inference.errors import PermanentError
from inference.prediction import (
    ANATOMICAL_STRUCTURE,
    ENTIRE_BODY,
    LUNG,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    SCT,
    Code,
    Label,
    SegmentKind,
)

LOCAL_SCHEME = "99DICOMNODE"
BACKGROUND_NAMES = frozenset({"background", "bg", "_background_", "clear_label"})

# Normalised label name -> SNOMED CT type (category Anatomical Structure unless said below).
_ANATOMY: dict[str, Code] = {
    "spleen": Code("78961009", SCT, "Spleen"),
    "liver": Code("10200004", SCT, "Liver"),
    "kidney": Code("64033007", SCT, "Kidney"),
    "kidney_left": Code("18639004", SCT, "Left kidney"),
    "kidney_right": Code("9846003", SCT, "Right kidney"),
    "pancreas": Code("15776009", SCT, "Pancreas"),
    "stomach": Code("69695003", SCT, "Stomach"),
    "gallbladder": Code("28231008", SCT, "Gallbladder"),
    "aorta": Code("15825003", SCT, "Aorta"),
    "esophagus": Code("32849002", SCT, "Esophagus"),
    "duodenum": Code("38848004", SCT, "Duodenum"),
    "small_bowel": Code("30315005", SCT, "Small Intestine"),
    "colon": Code("71854001", SCT, "Colon"),
    "urinary_bladder": Code("89837001", SCT, "Urinary bladder"),
    "prostate": Code("41216001", SCT, "Prostate"),
    "adrenal_gland": Code("23451007", SCT, "Adrenal gland"),
    "trachea": Code("44567001", SCT, "Trachea"),
    "heart": Code("80891009", SCT, "Heart"),
    "brain": Code("12738006", SCT, "Brain"),
    "spinal_cord": Code("2748008", SCT, "Spinal cord"),
    "lung": LUNG,
    "lung_left": Code("44029006", SCT, "Left lung"),
    "lung_right": Code("3341006", SCT, "Right lung"),
    "bone": Code("272673000", SCT, "Bone"),
    "body": ENTIRE_BODY,
}
_ALIASES = {
    "lungs": "lung",
    "left_lung": "lung_left",
    "right_lung": "lung_right",
    "left_kidney": "kidney_left",
    "right_kidney": "kidney_right",
    "kidneys": "kidney",
    "bladder": "urinary_bladder",
    "gall_bladder": "gallbladder",
    "oesophagus": "esophagus",
    "small_intestine": "small_bowel",
    "entire_body": "body",
    "bones": "bone",
}
_LESIONS = {
    "tumor": Code("108369006", SCT, "Neoplasm"),
    "tumour": Code("108369006", SCT, "Neoplasm"),
    "neoplasm": Code("108369006", SCT, "Neoplasm"),
    "lesion": Code("52988006", SCT, "Lesion"),
    "mass": Code("4147007", SCT, "Mass"),
    "nodule": Code("27925004", SCT, "Nodule"),
}


def normalise_name(name: str) -> str:
    """``"Left Kidney"`` -> ``"left_kidney"``: lower case, words joined by underscores."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def is_background(name: str) -> bool:
    return normalise_name(name) in BACKGROUND_NAMES


def label_for_name(name: str) -> Label:
    """A :class:`Label` with default codes for a model's label name (see the module docs)."""
    key = normalise_name(name)
    key = _ALIASES.get(key, key)
    if key in _ANATOMY:
        return Label(name=name, category=ANATOMICAL_STRUCTURE, type=_ANATOMY[key])
    for word, code in _LESIONS.items():
        if word in key.split("_"):
            return Label(name=name, category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE, type=code)
    # SH value: at most 16 characters.
    return Label(name=name, category=ANATOMICAL_STRUCTURE, type=Code(key[:16] or "unnamed", LOCAL_SCHEME, name))


@dataclass(frozen=True)
class LabelOverride:
    """Codes (and display hints) the configuration gives for one label index of a model."""

    index: int
    name: str | None = None
    category: Code | None = None
    type: Code | None = None
    kind: SegmentKind | None = None
    color: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if (self.category is None) != (self.type is None):
            raise PermanentError(
                f"label {self.index}: give both category and type codes, or neither"
            )


def build_labels(
    names: Mapping[int, str], overrides: Sequence[LabelOverride], *, model: str
) -> tuple[tuple[int, Label], ...]:
    """``(index, Label)`` for every non-background label of a model, sorted by index.

    ``names`` is the model's own index -> name map; ``overrides`` may rename a label, give its
    codes, kind and colour, or add an index the model does not name.  Raises
    :class:`~inference.errors.PermanentError` naming the model for an index given twice.
    """
    by_index: dict[int, LabelOverride] = {}
    for item in overrides:
        if item.index in by_index:
            raise PermanentError(f"model {model}: label index {item.index} is configured twice")
        by_index[item.index] = item
    out: list[tuple[int, Label]] = []
    for index in sorted(set(names) | set(by_index)):
        given = by_index.get(index)
        name = (given.name if given and given.name else None) or names.get(index) or f"label {index}"
        if given is None and is_background(name):
            continue
        label = label_for_name(name)
        if given is not None:
            label = Label(
                name=name,
                category=given.category or label.category,
                type=given.type or label.type,
                kind=given.kind or label.kind,
                color=given.color or label.color,
            )
        out.append((index, label))
    if not out:
        raise PermanentError(f"model {model} names no label to report (only background)")
    return tuple(out)
