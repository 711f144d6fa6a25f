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
