"""Patient and study attributes of a source image, cleaned before a result copies them.

highdicom copies every root attribute of the Patient, Clinical Trial Subject, General Study,
Patient Study and Clinical Trial Study modules from the first source image into each result.
A source that breaks the standard in an optional attribute (a ReferencedStudySequence item
without ReferencedSOPClassUID, an empty DeidentificationMethod, a PatientAge of ``"45"``) would
hand its error on to every result, and an archive that validates would refuse them.  The rules,
driven by the module tables highdicom ships (``_standard_utils``, the attribute types of PS3.3):

* a Type 3 attribute whose value does not fit its VR is left out; so is a Type 3 sequence item
  that lacks one of its Type 1 (present, non-empty) or Type 2 (present) attributes, and a
  sequence left with no item;
* a Type 2 attribute whose value does not fit its VR is copied empty;
* an empty Type 1C attribute is left out (present, it must have a value); when the source says
  ``PatientIdentityRemoved = YES`` without a method, DeidentificationMethod says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from highdicom._standard_utils import get_module_attribute_map
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DataElementSequence
from pydicom.valuerep import validate_value

#: The modules highdicom copies from a source image into every result (IEs Patient and Study).
_COPIED_MODULES = (
    "patient",
    "clinical-trial-subject",
    "general-study",
    "patient-study",
    "clinical-trial-study",
)

#: What DeidentificationMethod says when the source declared identity removed without a method.
UNSTATED_METHOD = "not stated in the source images"


@dataclass(frozen=True)
class _Rule:
    keyword: str
    type: str
    #: For a sequence: (keyword, type) of the attributes of its items.
    item: tuple[tuple[str, str], ...]


@lru_cache(maxsize=1)
def _rules() -> dict[str, _Rule]:
    table = get_module_attribute_map()
    rules: dict[str, _Rule] = {}
    for module in _COPIED_MODULES:
        entries = table[module]
        for entry in entries:
            if entry["path"]:
                continue
            keyword = str(entry["keyword"])
            item = tuple(
                (str(e["keyword"]), str(e["type"]))
                for e in entries
                if list(e["path"]) == [keyword]
            )
            rules.setdefault(keyword, _Rule(keyword, str(entry["type"]), item))
    return rules


def _empty(element: DataElement) -> bool:
    return element.value is None or element.value == "" or element.value == []


def _valid_value(element: DataElement) -> bool:
    if element.VR == "SQ" or _empty(element):
        return True
    try:
        validate_value(element.VR, element.value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _valid_item(item: Dataset, attributes: tuple[tuple[str, str], ...]) -> bool:
    for keyword, kind in attributes:
        if kind == "1" and (keyword not in item or _empty(item[keyword])):
            return False
        if kind == "2" and keyword not in item:
            return False
        if keyword in item and not _valid_value(item[keyword]):
            return False
    return True


def problems(source: Dataset) -> dict[str, DataElement | None]:
    """What :func:`clean_source` changes: keyword -> the element to put instead (None: leave out)."""
    rules = _rules()
    changes: dict[str, DataElement | None] = {}
    for keyword, rule in rules.items():
        if keyword not in source:
            continue
        element = source[keyword]
        if rule.type == "3":
            if element.VR == "SQ":
                items = list(element.value or [])
                kept = [i for i in items if _valid_item(i, rule.item)]
                if len(kept) != len(items):
                    changes[keyword] = (
                        DataElement(element.tag, "SQ", DataElementSequence(kept)) if kept else None
                    )
            elif not _valid_value(element):
                changes[keyword] = None
        elif rule.type == "2" and not _valid_value(element):
            changes[keyword] = DataElement(element.tag, element.VR, None)
        elif rule.type == "1C" and (_empty(element) or not _valid_value(element)):
            changes[keyword] = None
    if str(source.get("PatientIdentityRemoved", "")).upper() == "YES":
        has_method = any(
            k in source and changes.get(k, source[k]) is not None and not _empty(source[k])
            for k in ("DeidentificationMethod", "DeidentificationMethodCodeSequence")
        )
        if not has_method:
            tag = Dataset()
            tag.DeidentificationMethod = UNSTATED_METHOD
            changes["DeidentificationMethod"] = tag["DeidentificationMethod"]
    return changes


def shallow_copy(source: Dataset) -> Dataset:
    """A new dataset holding the same elements (``Dataset(source)`` would share them)."""
    copy = Dataset(dict(source.items()))
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    return copy


def clean_source(source: Dataset) -> Dataset:
    """``source``, or a shallow copy whose patient/study attributes a result may copy as they are.

    The caller's dataset is left alone and nothing else (pixel data included) is copied.
    """
    changes = problems(source)
    if not changes:
        return source
    copy = shallow_copy(source)
    for keyword, element in changes.items():
        if element is None:
            del copy[keyword]
        else:
            copy[keyword] = element
    return copy
