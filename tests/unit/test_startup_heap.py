"""``serve`` freezes what start-up left, so full collections do not walk it (node.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dicom_node.node import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Cyclic:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.usefixtures("unfrozen")
def test_objects_alive_at_startup_leave_the_collectors_generations() -> None:
    startup = [[i] for i in range(1000)]  # lists: always tracked by the collector
    frozen = freeze_startup_heap()
    assert frozen >= len(startup)
    tracked = {id(o) for o in gc.get_objects()}
    assert not any(id(o) in tracked for o in startup)
    later = [0]
    assert any(o is later for o in gc.get_objects())


@pytest.mark.usefixtures("unfrozen")
def test_garbage_made_before_the_freeze_is_collected_not_frozen() -> None:
    gc.disable()  # no automatic collection between making the garbage and the freeze
    try:
        for _ in range(500):
            _Cyclic()  # unreachable at once, freed only by the collector
        freeze_startup_heap()
    finally:
        gc.enable()
    gc.unfreeze()  # the frozen objects back into the oldest generation, to be looked at
    assert not any(isinstance(o, _Cyclic) for o in gc.get_objects())
