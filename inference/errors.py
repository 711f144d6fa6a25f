"""Exceptions of the ``inference`` package, split by how the caller reacts."""


class InferenceError(Exception):
    """Root of every error raised by :mod:`inference`."""


class TransientError(InferenceError):
    """Worth retrying later or elsewhere (e.g. CUDA out of memory)."""


class PermanentError(InferenceError):
    """The input cannot be used by this model; retrying will not help (fail the job)."""
