"""pynetdicom's reactor pause race, closed by ``dicom_node._compat.pynetdicom.ReactorCheckpoint``.

Before each request pynetdicom pauses the association's reactor thread and waits until it says
``_is_paused``; after the response it wakes it again.  ``_is_paused`` stayed True from the last
pause until the woken reactor thread ran, so on a loaded machine the next request went out while
the reactor was still waking, and the reactor took its response.  Here the reactor is made slow
to wake (as a starved thread) and the requester slow to turn from sending to waiting for the
answer, and several C-ECHOs go over one association to DCMTK's ``storescp``: each must be
answered.  A control shows pynetdicom's own checkpoint still losing
the answer, so the patch can go when an upgrade fixes it (this test then fails).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node._compat.pynetdicom import ReactorCheckpoint, TunedAE
from tests.support import procs

pytestmark = pytest.mark.integration
#: How long the woken reactor thread stays off the CPU, and the requesting thread between
#: sending a request and waiting for its answer (longer, so the answer is there first).
SLOW_WAKE_S = 0.1
SLOW_REQUESTER_S = 0.25


class _SlowPatched(ReactorCheckpoint):
    """The node's checkpoint, with the reactor off the CPU each time its wait returns."""

    def _woken(self) -> None:
        time.sleep(SLOW_WAKE_S)


class _SlowStock(threading.Event):
    """pynetdicom's checkpoint, with the reactor off the CPU each time its wait returns."""

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        time.sleep(SLOW_WAKE_S)
        return woken


class _AE(TunedAE):
    """The node's SCU, with the reactor's checkpoint swapped for ``checkpoint``."""

    def __init__(self, checkpoint: type[threading.Event]) -> None:
        super().__init__("DICOM_NODE")
        self.checkpoint = checkpoint
        self.add_requested_context(Verification)
        self.dimse_timeout = 2
        self.acse_timeout = self.network_timeout = 10

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        checkpoint = self.checkpoint(assoc) if self.checkpoint is _SlowPatched else self.checkpoint()
        checkpoint.set()
        assoc._reactor_checkpoint = checkpoint
        send_msg = assoc.dimse.send_msg

        def slow_send_msg(*args: Any, **kwargs: Any) -> None:
            send_msg(*args, **kwargs)
            time.sleep(SLOW_REQUESTER_S)  # descheduled after sending, as on a loaded machine

        assoc.dimse.send_msg = slow_send_msg  # type: ignore[method-assign]
        return sock


def _echo_statuses(port: int, checkpoint: type[threading.Event], count: int = 3) -> list[int | None]:
    assoc = _AE(checkpoint).associate(procs.LOOPBACK, port, ae_title="ARCHIVE")
    assert assoc.is_established
    try:
        statuses = []
        for _ in range(count):
            if not assoc.is_established:  # a lost answer aborts the association
                statuses.append(None)
                continue
            answer = assoc.send_c_echo()
            statuses.append(int(answer.Status) if "Status" in answer else None)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return statuses


def test_every_request_is_answered_when_the_reactor_wakes_late(storescp_archive: procs.Server) -> None:
    assert _echo_statuses(storescp_archive.port, _SlowPatched) == [0, 0, 0]


def test_pynetdicoms_own_checkpoint_still_loses_the_answer(storescp_archive: procs.Server) -> None:
    """The upstream race, still there: an answer goes to the reactor instead of the requester."""
    statuses = _echo_statuses(storescp_archive.port, _SlowStock)
    assert None in statuses, "pynetdicom no longer loses answers: drop ReactorCheckpoint"
