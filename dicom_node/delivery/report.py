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


@dataclass(frozen=True)
class SendReport:
    """What one delivery to one destination did (every file accepted, possibly with a warning)."""

    destination: str
    results: tuple[InstanceResult, ...]

    @property
    def sent(self) -> int:
        """Number of instances the destination accepted."""
        return len(self.results)

    @property
    def warnings(self) -> list[InstanceResult]:
        """Instances accepted with a warning status."""
        return [r for r in self.results if r.warning is not None]
