"""What the node's DICOM ends share: its implementation identity and TCP socket tuning.

Why the tuning: DCMTK and Orthanc keep Nagle's algorithm on unless ``TCP_NODELAY=1`` is in their
environment, and write each C-STORE message as two small writes, so every message waits for our
delayed ACK (~40 ms per instance; see docs/performance.md).  Each end defends itself by setting
``TCP_NODELAY`` on its socket and re-arming ``TCP_QUICKACK`` before each ``recv`` (Linux clears
it after use), and by sending each PDU in one call.  The SCP side is
:mod:`dicom_node.ingest.acceptor`, the SCU side :mod:`dicom_node._compat.pynetdicom`.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from typing import Final

#: ``TCP_QUICKACK`` exists on Linux only; elsewhere delayed ACKs cannot be switched off per recv.
TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)


def arm_quickack(sock: socket.socket) -> None:
    """Ask Linux to ACK the next segments at once (it clears the flag again after use)."""
    if TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


def tune_socket(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` and arm ``TCP_QUICKACK`` on a connected TCP socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    arm_quickack(sock)


#: Implementation Class UID and Version Name the node sends in A-ASSOCIATE (as SCP and SCU) and
#: writes into the file meta of spooled and result files.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    int.from_bytes(hashlib.sha256(b"dicom-node implementation class").digest()[:16], "big")
)
IMPLEMENTATION_VERSION_NAME = "DICOM_NODE_01"
