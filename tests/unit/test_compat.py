"""The private names of pynetdicom, highdicom and kombu the node patches still exist, in the shape
the patches assume: an upgrade that renames or reshapes one fails here, not in production.

The patches live in ``dicom_node/_compat/`` (one module per library); each test names the code
that depends on the name it checks.
"""

from __future__ import annotations

import inspect
import re
import threading

import highdicom as hd
import pynetdicom
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from pynetdicom import _config
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AddressInformation, AssociationSocket


def _parameters(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


def test_pynetdicom_dul_privates_used_by_the_tuned_dul() -> None:
    """``TunedDUL`` sets ``_run_loop_delay`` and ``_kill_thread`` and overrides ``send_pdu``,
    ``kill_dul`` and ``stop_dul``; the C-STORE SCU reads ``peek_next_pdu``."""
    dul = DULServiceProvider(Association(ApplicationEntity(), "requestor"))
    assert isinstance(dul._run_loop_delay, float)
    assert isinstance(dul._kill_thread, bool)
    assert dul.state_machine.current_state == "Sta1"
    assert _parameters(DULServiceProvider.send_pdu) == ["self", "primitive"]
    assert _parameters(DULServiceProvider.kill_dul) == ["self"]
    assert _parameters(DULServiceProvider.stop_dul) == ["self"]
    assert _parameters(DULServiceProvider.peek_next_pdu) == ["self"]
    assert dul.peek_next_pdu() is None


def test_pynetdicom_socket_privates_used_by_the_tuned_socket() -> None:
    """``TunedAssociationSocket`` overrides ``_create_socket(address)``, ``ready``, ``recv`` and
    ``send``, and reads ``_is_connected``, ``event_queue`` and ``tls_args``."""
    assert _parameters(AssociationSocket._create_socket) == ["self", "address"]
    assert isinstance(inspect.getattr_static(AssociationSocket, "ready"), property)
    assert _parameters(AssociationSocket.recv) == ["self", "nr_bytes"]
    assert _parameters(AssociationSocket.send) == ["self", "bytestream"]
    sock = AssociationSocket(Association(ApplicationEntity(), "requestor"), address=AddressInformation("127.0.0.1", 0))
    try:
        assert sock._is_connected is False
    finally:
        sock.close()
    assert hasattr(sock, "event_queue") and hasattr(sock, "tls_args")


def test_pynetdicom_application_entity_creates_sockets_through_one_private_method() -> None:
    """``TunedAE`` overrides ``ApplicationEntity._create_socket(assoc, address, tls_args)``."""
    assert _parameters(ApplicationEntity._create_socket) == ["self", "assoc", "address", "tls_args"]


def test_pynetdicom_reactor_checkpoint_privates() -> None:
    """``install_reactor_checkpoint`` replaces ``Association._reactor_checkpoint`` (an Event the
    reactor waits on, set at start) and writes ``_is_paused`` and ``network_timeout_response``;
    ``ReactorCheckpoint.wait`` stands where the reactor loop says paused, waits, says not paused."""
    assoc = Association(ApplicationEntity(), "requestor")
    assert isinstance(assoc._reactor_checkpoint, threading.Event) and assoc._reactor_checkpoint.is_set()
    assert assoc._is_paused is False
    assert assoc.network_timeout_response == "A-ABORT"
    loop = inspect.getsource(Association._run_reactor)
    assert re.search(r"self\._is_paused = True\s+self\._reactor_checkpoint\.wait\(\)\s+self\._is_paused = False",
                     loop), "the reactor's pause changed shape: re-check ReactorCheckpoint"


def test_pynetdicom_chunked_store_flag() -> None:
    """``send_files_as_stored_bytes`` sets ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``."""
    assert isinstance(_config.STORE_SEND_CHUNKED_DATASET, bool)
    assert pynetdicom.__version__.startswith("3.")


def test_highdicom_segmentation_pixel_check() -> None:
    """The SEG encoder overrides ``Segmentation._check_and_cast_pixel_array`` (a classmethod of
    ``(pixel_array, segment_numbers, segmentation_type, dtype)`` returning the array and the
    overlap value)."""
    method = inspect.getattr_static(hd.seg.Segmentation, "_check_and_cast_pixel_array")
    assert isinstance(method, classmethod)
    assert _parameters(hd.seg.Segmentation._check_and_cast_pixel_array) == [
        "pixel_array", "segment_numbers", "segmentation_type", "dtype",
    ]
    assert {v.name for v in hd.seg.SegmentsOverlapValues} >= {"YES", "NO"}


def test_kombu_sqlalchemy_channel_builds_its_engine_in_one_private_method() -> None:
    """The embedded broker's channel overrides ``Channel._engine_from_config()``, ``_put`` (to wake
    the consumers), ``basic_ack``/``basic_reject``; its transport overrides ``drain_events`` and
    reads ``cycle``, ``_deliver`` and ``polling_interval``; it registers in ``TRANSPORT_ALIASES``."""
    from kombu.transport import virtual

    from dicom_node._compat import kombu as ours

    assert _parameters(kombu_sqla.Channel._engine_from_config) == ["self"]
    assert _parameters(kombu_sqla.Channel._put)[:3] == ["self", "queue", "payload"]
    assert _parameters(virtual.Channel.basic_ack)[:3] == ["self", "delivery_tag", "multiple"]
    assert _parameters(virtual.Channel.basic_reject)[:3] == ["self", "delivery_tag", "requeue"]
    assert _parameters(virtual.Transport.drain_events)[:3] == ["self", "connection", "timeout"]
    assert callable(virtual.Transport._deliver) and hasattr(virtual.Transport, "polling_interval")
    assert "cycle" in inspect.getsource(virtual.Transport.__init__)
    assert issubclass(kombu_sqla.Transport, object) and kombu_sqla.Transport.Channel is kombu_sqla.Channel
    assert "sqla" in TRANSPORT_ALIASES
    ours.register()
    assert TRANSPORT_ALIASES["sqla"] == "dicom_node._compat.kombu:Transport"


def test_the_segmentation_override_answers_as_highdicom_does() -> None:
    """``dicom_node._compat.highdicom.Segmentation`` overrides the pixel check, and for binary
    stacks with and without overlapping segments it finds what highdicom's own check finds."""
    import numpy as np

    from dicom_node._compat.highdicom import Segmentation

    assert "_check_and_cast_pixel_array" in vars(Segmentation)
    rng = np.random.default_rng(7)
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY
    for overlapping in (False, True):
        labels = rng.integers(0, 4, size=(5, 12, 12))
        stack = np.stack([labels == k for k in (1, 2, 3)], axis=-1)
        if overlapping:
            stack[2, 3, 3, :] = True
        ours = Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)[1]
        theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)[1]
        assert ours == theirs == (hd.seg.SegmentsOverlapValues.YES if overlapping else hd.seg.SegmentsOverlapValues.NO)
