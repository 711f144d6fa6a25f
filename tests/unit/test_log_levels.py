"""configure_logging keeps library chatter out of an operator's log: highdicom's per-object
"copy attributes" lines and alembic's set-up lines are dropped, their warnings kept."""

from __future__ import annotations

import logging

import pytest
import structlog

from dicom_node.logs import configure_logging


@pytest.mark.parametrize("library", ["highdicom.base", "alembic.runtime.migration", "alembic.runtime.plugins"])
def test_library_info_lines_are_dropped_and_warnings_kept(library: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    try:
        configure_logging("json")
        logger = logging.getLogger(library)
        logger.info('copy attributes of module "Patient"')
        logger.warning("something the operator should see")
        out = capsys.readouterr()
        text = out.out + out.err
        assert "copy attributes" not in text
        assert "something the operator should see" in text
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name in ("highdicom", "alembic"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.captureWarnings(False)
        structlog.configure(**saved_structlog)
