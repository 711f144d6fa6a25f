"""Models and the image volume they run on: numpy + torch only, no DICOM.

See ``docs/architecture.md``: this package must not import pydicom, pynetdicom, celery or
anything in ``dicom_node``.
"""

from inference.errors import InferenceError, PermanentError, TransientError
from inference.prediction import Code, Label, Measurement, Prediction, Segment
from inference.volume import Volume

__all__ = [
    "Code",
    "InferenceError",
    "Label",
    "Measurement",
    "PermanentError",
    "Prediction",
    "Segment",
    "TransientError",
    "Volume",
]
