"""Sending results to destinations: the DICOM C-STORE target (its tuned pynetdicom transport is
``dicom_node._compat.pynetdicom``)."""
