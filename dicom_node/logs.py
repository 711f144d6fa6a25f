"""Structured logging: JSON in production, readable in a terminal.

Log lines carry UIDs and AE titles, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import sys

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


def _drop_phi(_logger: object, _name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = "[removed]"
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
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs "copy attributes of module ..." lines at INFO for every SEG/SR it encodes,
    # alembic its context and plugin set-up at every start: warnings only.
    for name in ("highdicom", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
