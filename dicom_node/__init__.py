"""dicom-node: a DICOM-native AI inference node (listener, catalog, routing, results, sender)."""

__version__ = "0.1.0"
