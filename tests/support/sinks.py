"""An ingest sink for tests and tools that only receive."""

from __future__ import annotations

import threading

from dicom_node.ingest.events import AssociationSummary, StoredInstance


class CollectingSink:
    """A sink that keeps everything in memory (for tests and tools that only receive)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.instances: list[StoredInstance] = []
        self.associations: list[AssociationSummary] = []

    def instance_stored(self, instance: StoredInstance) -> None:
        with self._lock:
            self.instances.append(instance)

    def association_ended(self, summary: AssociationSummary) -> None:
        with self._lock:
            self.associations.append(summary)
