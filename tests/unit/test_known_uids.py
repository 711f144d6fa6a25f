"""The in-memory index of stored SOP Instance UIDs (a Bloom filter): never a false "not
stored", and false "maybe"s at about the rate it is sized for."""

from __future__ import annotations

import random

from dicom_node.catalog.known import FALSE_POSITIVE_RATE, KnownUids


def uids(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)  # noqa: S311 - reproducible test UIDs, not secrets
    return [f"1.2.826.0.1.3680043.8.498.{rng.getrandbits(96)}.{i}" for i in range(n)]


def test_every_added_uid_is_known() -> None:
    added = uids(1, 50_000)
    known = KnownUids(capacity=50_000)
    for uid in added:
        known.add(uid)
    assert all(uid in known for uid in added)
    assert known.count == 50_000


def test_false_positives_near_the_rate_it_is_sized_for() -> None:
    known = KnownUids.of(uids(2, 20_000))  # sized for a million: far below capacity
    assert known.capacity == 1_000_000
    assert sum(uid in known for uid in uids(3, 20_000)) == 0
    full = KnownUids(capacity=20_000)
    for uid in uids(4, 20_000):
        full.add(uid)
    rate = sum(uid in full for uid in uids(5, 20_000)) / 20_000
    assert rate < 2 * FALSE_POSITIVE_RATE, rate  # at capacity: about 1 %


def test_size_follows_the_capacity() -> None:
    # 1 % false positives: 9.6 bits per UID, 7 hash positions.
    assert 1_150_000 <= KnownUids(capacity=1_000_000).nbytes <= 1_250_000
    assert KnownUids.of([]).capacity == 1_000_000
    assert KnownUids.of(["1.2.3"] * 300_000).capacity == 1_200_000  # four times what it starts with
    assert "not a uid" not in KnownUids() and 42 not in KnownUids()
