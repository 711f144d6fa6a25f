"""Sending results to destinations, through a small registry of target types.

A destination's ``type`` (``[[destinations]] type = ...``) picks its target: ``dicom`` (C-STORE,
:mod:`dicom_node.delivery.dicom`, whose tuned pynetdicom transport is
``dicom_node._compat.pynetdicom``) or ``dicomweb`` (STOW-RS, :mod:`dicom_node.delivery.dicomweb`).
A new type is one module with ``send``, ``reachable`` and ``check_overwrite`` functions plus one
line in :data:`TARGETS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from dicom_node.delivery import dicom, dicomweb
from dicom_node.delivery.report import InstanceResult, Overwrite, SendReport
from dicom_node.settings import DestinationSettings

__all__ = ["TARGETS", "InstanceResult", "Overwrite", "SendReport", "Target", "check_overwrite", "reachable",
           "send_files"]


class Target(Protocol):
    """What a destination type does."""

    def send(self, dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str) -> SendReport:
        """Deliver the files; raise ``TransientError`` (retry) or ``PermanentError`` (refused)."""
        ...

    def reachable(self, dest: DestinationSettings, *, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
        """Whether the destination answers (C-ECHO, or an authenticated request), and why not."""
        ...

    def check_overwrite(self, dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str,
                        timeout: float = 30.0) -> list[Overwrite]:
        """Which version the destination holds of objects it was sent again (same SOP Instance
        UIDs, new content): one :class:`Overwrite` each; never raises for the destination's sake."""
        ...


#: Destination types by their ``type`` value: one line each.
TARGETS: dict[str, Target] = {
    "dicom": dicom,
    "dicomweb": dicomweb,
}


def send_files(dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str) -> SendReport:
    """Deliver ``paths`` to ``dest`` by its type."""
    return TARGETS[dest.type].send(dest, paths, calling_ae_title=calling_ae_title)


def reachable(dest: DestinationSettings, *, calling_ae_title: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether ``dest`` answers, by its type (C-ECHO for dicom, an authenticated QIDO for dicomweb)."""
    return TARGETS[dest.type].reachable(dest, calling_ae_title=calling_ae_title, timeout=timeout)


def check_overwrite(dest: DestinationSettings, paths: Sequence[Path], *, calling_ae_title: str,
                    timeout: float = 30.0) -> list[Overwrite]:
    """Which version ``dest`` holds of objects sent to it again, by its type (C-FIND for dicom,
    QIDO-RS for dicomweb)."""
    return TARGETS[dest.type].check_overwrite(dest, paths, calling_ae_title=calling_ae_title, timeout=timeout)
