"""Exceptions of the ``dicom_node`` package, split by how the caller reacts.

Catch broad exceptions only at process boundaries (the SCP handler, a Celery task) and turn
them into a DICOM status or a job state with the reason.
"""


class DicomNodeError(Exception):
    """Root of every error raised by :mod:`dicom_node`."""


class ConfigError(DicomNodeError):
    """The configuration file or environment is invalid; the message names the key."""


class TransientError(DicomNodeError):
    """Worth retrying: peer down, association rejected, out of resources."""


class AssociationRejectedError(TransientError):
    """The peer answered, with an A-ASSOCIATE-RJ: it is up, but not for this association."""


class PermanentError(DicomNodeError):
    """Unsupported or inconsistent input; retrying will not help (fail the job with the reason)."""


class InvalidUIDError(PermanentError):
    """A UID that is not a valid DICOM UID (and so must never become a path part)."""
