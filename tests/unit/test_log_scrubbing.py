"""The log scrubber (``dicom_node.logs``): library text, warnings and remembered patient values."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
import structlog

from dicom_node import logs


@pytest.fixture
def json_lines():  # type: ignore[no-untyped-def]
    """JSON log lines as ``configure_logging("json")`` renders them (read from its handler).
    structlog's configuration is put back afterwards: configure_logging caches loggers on first
    use, which would keep later tests' ``capture_logs`` from seeing them."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure_logging("json")
    buf = io.StringIO()
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    logging.captureWarnings(False)
    logs._PHI_VALUES.clear()
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_quoted_parts_of_library_text_are_removed() -> None:
    """pydicom/highdicom/Celery quote the values they complain about: those parts go."""
    text = "Retry in 1s: ValueError(\"Unable to convert '1933-11-22' to 'DA' object\")"
    assert "1933" not in logs.scrub_text(text) and logs.scrub_text(text).startswith("Retry in 1s: ValueError(")
    assert logs.scrub_text('The string "Vexlethorpe" is unlikely') == "The string '[removed]' is unlikely"


def test_a_traceback_keeps_its_code_locations_and_loses_its_values() -> None:
    """File/line locations and source lines stay (debugging); exception messages are scrubbed."""
    tb = ('Traceback (most recent call last):\n  File "/srv/x.py", line 3, in f\n    DA("1933")\n'
          "ValueError: Unable to convert '1933-11-22' to 'DA' object")
    out = logs.scrub_traceback(tb)
    assert '  File "/srv/x.py", line 3, in f' in out and '    DA("1933")' in out
    assert "1933-11-22" not in out


def test_warnings_and_exceptions_reach_the_log_scrubbed(json_lines) -> None:  # type: ignore[no-untyped-def]
    """A Python warning becomes a log line (captureWarnings) without its quoted value; a logged
    exception keeps its type; a remembered patient value is removed even unquoted."""
    logs.remember_phi(["Vexlethorpe^Ann", "PID-61829374-XQ"])
    warnings.warn('The string "Zorblatt" is unlikely to represent a person name', UserWarning, stacklevel=1)
    bad = "-".join(("1933", "11", "22"))  # not literal: traceback source lines are kept
    try:
        raise ValueError(f"Unable to convert '{bad}' to 'DA' object")
    except ValueError:
        structlog.get_logger("t").exception("encoding_failed", error="bad value '19331122'")
    structlog.get_logger("t").info("seen", note="patient Vexlethorpe PID-61829374-XQ Ann")
    logging.getLogger("celery.app.trace").info("Task x raised: ValueError('Vexlethorpe')")
    text = json.dumps(json_lines())
    for value in ("Zorblatt", "1933-11-22", "19331122", "Vexlethorpe", "PID-61829374-XQ", "Ann\""):
        assert value not in text, value
    assert "is unlikely to represent a person name" in text and "ValueError" in text and "encoding_failed" in text
