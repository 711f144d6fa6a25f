"""What a delivery reports, whatever the destination type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InstanceResult:
    """The outcome of one instance (a C-STORE, or one instance of a STOW-RS request)."""

    path: Path
    sop_instance_uid: str
    status: int
    #: Set for warning statuses (0x0001, 0xBxxx): what the archive said.
    warning: str | None = None
    #: Set when the destination refused the object's class at negotiation (nothing was sent):
    #: ``"refused: Segmentation Storage not accepted"``.  ``status`` is then 0.
    refused: str | None = None
    #: The object's SOP Class UID, when the target knows it (for the per-object record).
    sop_class_uid: str | None = None

    @property
    def outcome(self) -> str:
        """``sent`` or ``refused``: what the per-object record of a delivery says."""
        return "refused" if self.refused is not None else "sent"

    def record(self) -> dict[str, str | int | None]:
        """The JSON-ready per-object record kept in the catalog (no file path)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class": _class_name(self.sop_class_uid),
            "outcome": self.outcome,
            "status": self.status if self.refused is None else None,
            "detail": self.refused or self.warning,
        }


def _class_name(uid: str | None) -> str | None:
    if uid is None:
        return None
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else uid


@dataclass(frozen=True)
class SendReport:
    """What one delivery to one destination did: each file sent (possibly with a warning) or refused."""

    destination: str
    results: tuple[InstanceResult, ...]

    @property
    def sent(self) -> int:
        """Number of instances the destination accepted."""
        return sum(1 for r in self.results if r.refused is None)

    @property
    def warnings(self) -> list[InstanceResult]:
        """Instances accepted with a warning status."""
        return [r for r in self.results if r.warning is not None]

    @property
    def refused(self) -> list[InstanceResult]:
        """Instances whose class the destination refused at negotiation (not sent)."""
        return [r for r in self.results if r.refused is not None]

    def records(self) -> list[dict[str, str | int | None]]:
        """Per-object records for the catalog (``deliveries.objects``)."""
        return [r.record() for r in self.results]


# -- does a destination replace an object sent again with the same SOP Instance UID? -------

#: The node-set attributes compared: highdicom stamps each result with the time it was made (to
#: the microsecond), and archives index them at instance level (Orthanc keeps both as main tags).
CREATION_STAMP = ("InstanceCreationDate", "InstanceCreationTime")
#: Where to look for the fix, by what a wrong archive setting is called.
KEEPS_FIRST_FIX = ('Orthanc: "OverwriteInstances": true (for DICOM and DICOMweb alike); dcm4chee-arc: '
                   "Overwrite Policy (dcmOverwritePolicy) ALWAYS, or SAME_SOURCE when only the node sends "
                   "these objects")


@dataclass(frozen=True)
class Overwrite:
    """What the destination holds for one object the node sent again with a known SOP Instance
    UID.

    ``replaced`` is True when it holds what was just sent, False when it still holds an older
    object (it keeps the first), None when the query could not tell.
    """

    sop_instance_uid: str
    replaced: bool | None
    detail: str


@dataclass(frozen=True)
class Stamped:
    """A result file's UIDs and its creation stamp (``"date time"``, empty when it has none)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    stamp: str


def read_stamp(path: Path) -> Stamped:
    """The UIDs and creation stamp of a result file (header only)."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", *CREATION_STAMP])
    return Stamped(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                   " ".join(str(ds.get(k, "") or "") for k in CREATION_STAMP).strip())


def compare_stamps(sop_instance_uid: str, held: str, sent: str, *, where: str, query: str) -> Overwrite:
    """:class:`Overwrite` from the stamp ``where`` returned to ``query`` (C-FIND, QIDO-RS) and the
    one sent; unknown when either is missing."""
    if not held or not sent:
        return Overwrite(sop_instance_uid, None, f"{query} at {where} returned no instance creation time")
    if held == sent:
        return Overwrite(sop_instance_uid, True, f"{where} holds the object sent (created {sent})")
    return Overwrite(sop_instance_uid, False,
                     f"{where} still holds the object created {held}, not the one sent (created {sent})")
