"""Structured logging: JSON in production, readable in a terminal.

Log lines carry UIDs and AE titles, never patient names, IDs or birth dates.  Three layers
keep them out, applied to every line (the node's own and those of libraries):

- keys named for patient data (:data:`PHI_KEYS`) are blanked;
- text the node did not write - a library's exception message or traceback, a Python warning
  (routed into logging by ``logging.captureWarnings``), a library's own log line, and the
  ``error``/``reason``/``detail`` values that carry such text - has every quoted part replaced
  by ``'[removed]'`` (:func:`scrub_text`: pydicom, highdicom and Celery quote the values they
  complain about);
- values this process was told about (:func:`remember_phi`: the worker registers the patient
  name, its components, ID and birth date of every series it loads) are replaced wherever
  they appear, quoted or not.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, MutableSequence
from typing import Any

import structlog

#: Keys that must never reach a log line, whatever a caller binds.
PHI_KEYS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "OtherPatientIDs",
        "PatientAddress",
    }
)


REMOVED = "[removed]"

#: Keys of the node's own log lines whose values may hold a library's text.
TEXT_KEYS = frozenset({"error", "reason", "detail", "exception", "warning", "message"})

#: A quoted part of a message ('...' or "..." on one line), bounded so a stray quote cannot
#: swallow a whole line.
_QUOTED = re.compile(r"'[^'\n]{0,512}'|\"[^\"\n]{0,512}\"")


def scrub_text(text: str) -> str:
    """``text`` with every quoted part replaced by ``'[removed]'`` and every remembered patient
    value (:func:`remember_phi`) by ``[removed]``.  For text the node did not write itself:
    exception messages, warnings, library log lines."""
    return _PHI_VALUES.replace(_QUOTED.sub(f"'{REMOVED}'", text))


def scrub_known_phi(text: str) -> str:
    """``text`` (the node's own words) with every remembered patient value (:func:`remember_phi`)
    replaced by ``[removed]``; quoted parts are kept."""
    return _PHI_VALUES.replace(text)


def scrub_traceback(text: str) -> str:
    """A formatted traceback with its messages scrubbed (:func:`scrub_text`) but its code
    locations (``File "...", line N`` and the source line under it) kept for debugging."""
    out: list[str] = []
    code_next = False
    for line in text.split("\n"):
        if line.startswith('  File "'):
            out.append(_PHI_VALUES.replace(line))
            code_next = True
        elif code_next and line.startswith("    "):
            out.append(_PHI_VALUES.replace(line))  # source lines and their ^^^ markers
        else:
            out.append(scrub_text(line))
            code_next = False
    return "\n".join(out)


class _RememberedValues:
    """Patient values seen by this process (most recent :attr:`limit`), replaced in every line."""

    def __init__(self, limit: int = 512) -> None:
        self.limit = limit
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            changed = False
            for value in values:
                # Short values (a sex "M", a one-letter component) would blank ordinary words.
                if len(value) < 3:
                    continue
                if value not in self._values:
                    changed = True
                self._values[value] = None
                self._values.move_to_end(value)
            while len(self._values) > self.limit:
                self._values.popitem(last=False)
                changed = True
            if changed:
                ordered = sorted(self._values, key=len, reverse=True)  # longest first
                self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def replace(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(REMOVED, text) if pattern is not None else text

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None


_PHI_VALUES = _RememberedValues()


def remember_phi(values: Iterable[Any]) -> None:
    """Never log these values (a patient's name, name components, ID, birth date) in this
    process from now on, wherever they appear in a line."""
    texts: list[str] = []
    for value in values:
        if value is None:
            continue
        text = str(value).strip()
        if not text:
            continue
        texts.append(text)
        # A person name's components (family^given^middle^prefix^suffix, and = groups).
        texts += [part.strip() for part in re.split(r"[\^=]", text) if part.strip()]
    _PHI_VALUES.add(texts)


#: Attributes holding patient identity: :func:`remember_patients` registers their values.
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress",
                "PatientMotherBirthName", "OtherPatientNames")


def remember_patients(datasets: Iterable[Any]) -> None:
    """:func:`remember_phi` for the patient attributes (:data:`PHI_KEYWORDS`) of pydicom datasets."""
    values: set[str] = set()
    for ds in datasets:
        for keyword in PHI_KEYWORDS:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            # A multi-valued element (pydicom's MultiValue is a MutableSequence), else one value.
            items = value if isinstance(value, MutableSequence | list | tuple) else [value]
            values.update(str(v) for v in items)
    remember_phi(values)


def _drop_phi(_logger: object, _name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = REMOVED
    return event_dict


def _scrub(value: Any, *, third_party: bool) -> Any:
    if isinstance(value, str):
        return scrub_text(value) if third_party else _PHI_VALUES.replace(value)
    if isinstance(value, list | tuple):
        return [_scrub(v, third_party=third_party) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, third_party=third_party) for k, v in value.items()}
    if isinstance(value, BaseException):
        return scrub_text(f"{type(value).__name__}: {value}")
    return value


def _scrub_event(_logger: object, _name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """Scrub a line after exceptions are formatted, before it is rendered (see module doc)."""
    # A stdlib record (Celery, pydicom, highdicom, py.warnings): its message is a library's text.
    foreign = event_dict.get("_from_structlog") is False
    for key, value in list(event_dict.items()):
        if key.startswith("_"):
            continue
        if key == "exception" and isinstance(value, str):
            event_dict[key] = scrub_traceback(value)
            continue
        third_party = key in TEXT_KEYS or (foreign and key == "event")
        event_dict[key] = _scrub(value, third_party=third_party)
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    """Route structlog and stdlib logging to stderr as JSON (``json``) or text (``console``)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a module's logger then follows a later configuration (a second call, or
        # structlog.testing.capture_logs) instead of keeping the first one it was used under.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.processors.format_exc_info,
                _scrub_event,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Warnings (pydicom's and highdicom's quote values) become log records, scrubbed like any.
    # Off first: captureWarnings(True) does nothing while it believes it is on, even when
    # something since put warnings.showwarning back (a warnings.catch_warnings block does).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers.clear()
    # pynetdicom logs every PDU at INFO; keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs "copy attributes of module ..." lines at INFO for every SEG/SR it encodes,
    # alembic its context and plugin set-up at every start: warnings only.
    for name in ("highdicom", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
