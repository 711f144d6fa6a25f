"""The screenshots the documents show (``docs/images/*.png``), taken by browser tests.

A test run writes them under the test's ``tmp_path``, so running the suite leaves the git work
tree as it was; ``DICOM_NODE_UPDATE_SCREENSHOTS=1`` writes them to ``docs/images/`` instead, to
refresh the documents' pictures after a change to the dashboard or the results.  Either way the
test checks the file it wrote (:func:`check_png`).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

#: ``1``: write the screenshots to docs/images/ (the documents' copies), not to tmp_path.
UPDATE_ENV = "DICOM_NODE_UPDATE_SCREENSHOTS"
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def screenshot_dir(tmp_path: Path) -> Path:
    """docs/images/ under ``DICOM_NODE_UPDATE_SCREENSHOTS=1``, else ``tmp_path/screenshots``."""
    folder = DOCS_IMAGES if os.environ.get(UPDATE_ENV) == "1" else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_png(path: Path) -> tuple[int, int]:
    """``path`` is a complete PNG with pixels; returns its (width, height)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.load()  # a truncated file fails here
        width, height = image.size
    assert width > 0 and height > 0, f"{path} is empty"
    return width, height
