"""Queue and task names the producer (``serve``) and the workers share, and the retry backoff.

A module of its own so that the tasks need not import the app that registers them.
"""

from __future__ import annotations

import random

INFERENCE_QUEUE = "inference"
DISPATCH_QUEUE = "dispatch"
INFERENCE_TASK = "dicom_node.inference"
DISPATCH_TASK = "dicom_node.dispatch"
#: Redis priorities: lower runs first.
PRIORITIES = {"urgent": 0, "normal": 5}


def backoff_seconds(attempt: int, base: float, ceiling: float) -> float:
    """Exponential backoff with full jitter: ``uniform(0.5, 1) * min(ceiling, base * 2**attempt)``."""
    return float(min(ceiling, base * (2 ** max(0, attempt - 1))) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not security
