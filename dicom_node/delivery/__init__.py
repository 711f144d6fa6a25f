"""Sending results to destinations: the DICOM C-STORE target and its tuned SCU transport."""
