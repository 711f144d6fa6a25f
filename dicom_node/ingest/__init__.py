"""Receiving: the DICOM upper layer (acceptor), the Storage SCP (listener), the header reader,
the durable spool, and the recorder that hands stored instances to the catalog."""
