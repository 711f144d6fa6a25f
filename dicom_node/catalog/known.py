"""Which SOP Instance UIDs the catalog may hold, answered in memory (a Bloom filter).

Every C-STORE asks whether its SOP Instance UID is already stored in another series (the
duplicate-UID check of :meth:`~dicom_node.catalog.recorder.CatalogRecorder.claim`).  Almost
always it is not, and the catalog query that says so cost each association thread several
hand-overs of the interpreter lock (SQLite releases it around each call): with 4 associations at
once the listener spends its time queueing for the lock (docs/performance.md, "four
associations on one interpreter").  The filter answers "certainly not stored" without the
catalog; "maybe" still asks the catalog, so an answer is never wrong, only sometimes slower.

A Bloom filter has no false negatives, as long as every UID written to the catalog is added:
the recorder builds it from the catalog when it starts and adds each UID it claims or records.
Deleted instances (retention) stay in it: they only cost the query again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection

#: False positives wanted at the filter's capacity (each one only costs the catalog query).
FALSE_POSITIVE_RATE = 0.01
#: Capacity of a filter for an empty or small catalog; a filter is sized for at least four times
#: the UIDs it starts with, so a node grows into it (past its capacity, more answers are "maybe").
MIN_CAPACITY = 1_000_000


class KnownUids:
    """A Bloom filter of SOP Instance UIDs: ``uid in known`` is False only for a UID never added.

    Not thread-safe for :meth:`add`: the caller holds its own lock (reads may run beside an
    add: a bit is only ever set, so a concurrent read sees the UID or asks the catalog).
    Adding a UID again changes no answer; :attr:`count` counts the additions.
    """

    def __init__(self, capacity: int = MIN_CAPACITY, false_positive_rate: float = FALSE_POSITIVE_RATE) -> None:
        capacity = max(1, capacity)
        bits = math.ceil(-capacity * math.log(false_positive_rate) / math.log(2) ** 2)
        self._bits = bytearray((bits + 7) // 8)
        self._size = len(self._bits) * 8
        self._hashes = max(1, round(self._size / capacity * math.log(2)))
        self.capacity = capacity
        self.count = 0

    @classmethod
    def of(cls, uids: Collection[str]) -> KnownUids:
        """A filter holding ``uids``, sized for four times as many."""
        known = cls(max(MIN_CAPACITY, 4 * len(uids)))
        for uid in uids:
            known.add(uid)
        return known

    @property
    def nbytes(self) -> int:
        return len(self._bits)

    def _positions(self, uid: str) -> list[int]:
        digest = hashlib.blake2b(uid.encode("ascii", "replace"), digest_size=16).digest()
        first = int.from_bytes(digest[:8], "little")
        step = int.from_bytes(digest[8:], "little") | 1
        size = self._size
        return [(first + i * step) % size for i in range(self._hashes)]

    def add(self, uid: str) -> None:
        bits = self._bits
        for pos in self._positions(uid):
            bits[pos >> 3] |= 1 << (pos & 7)
        self.count += 1

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, str):
            return False
        bits = self._bits
        return all(bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(uid))
