"""Receiving: the DICOM upper layer (acceptor), the Storage SCP (listener), the header reader
and the durable spool; what ingest reports (``events``) is consumed by the catalog's recorder."""
