"""The node's SEG and SR in the real OHIF Viewer (3.13.2, npm ``@ohif/app``), served against a real
Orthanc with its DICOMweb plugin, in headless Chromium (WebGL through SwiftShader).

One study: a chest phantom CT with three nodules and the results of the built-in models on it
(ct-tissue, ct-lung-nodules, foreground), plus a second CT series of the same study without
nodules, on which ct-lung-nodules finds nothing (its SR has no measurement group at all).
Every SR is opened in the viewer; the test fails on OHIF's error boundary ("Something went
wrong", which OHIF logs only at debug level), on any uncaught page error, on any console error
of the SR extension, when a finding's measurements are not drawn on the image, or when the
nodule SEG does not overlay the nodule's pixels.  The screenshots docs/results.md shows are taken
to tmp_path, to docs/images/ under DICOM_NODE_UPDATE_SCREENSHOTS=1 (tests/support/screenshots.py).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import require_orthanc_dicomweb, require_playwright, require_tool
from tests.support import ohif
from tests.support.screenshots import check_png
from tests.support.study import Study, build_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}




def _need_viewer() -> Path:
    require_tool("chromium", "npm")
    require_orthanc_dicomweb()
    return ohif.fetch_ohif_dist()


@dataclass
class Viewer:
    page: Any
    console: list[str]
    url: str

    def fresh(self) -> None:
        """Load the study in a fresh viewer (OHIF keeps an opened SR's state across series)."""
        self.page.goto(self.url)
        self.page.get_by_text("AI SR ct-lung-nodules 1.0.0").first.wait_for()
        self.page.locator("[data-cy=viewport-pane] canvas").first.wait_for()
        # The CT is on screen when its overlay (window, orientation markers) is.
        for _ in range(240):
            text = str(self.page.locator("[data-cy=viewport-pane]").first.text_content())
            if "W:" in text and "AR" in text.replace("\n", ""):
                break
            self.page.wait_for_timeout(250)
        self.page.wait_for_timeout(1500)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Viewer, Study]]:
    dist = _need_viewer()
    sync_playwright = require_playwright()
    tmp = tmp_path_factory.mktemp("ohif")
    study = build_study(tmp / "data")
    with ohif.start_orthanc(tmp / "orthanc") as orthanc:
        for path in study.files:
            ohif.orthanc_upload(orthanc.port, path.read_bytes())
        with ohif.ViewerServer(dist, orthanc.port) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(30_000)
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                # OHIF's first-visit tour (shepherd.js) would cover the viewport.
                page.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));")
                yield Viewer(page, console, f"{server.origin}/viewer?StudyInstanceUIDs={study.uid}"), study
            finally:
                browser.close()


def _problems(console: list[str]) -> list[str]:
    """Console lines that mean a broken viewer (error boundary, uncaught errors, SR failures)."""
    bad = re.compile(
        r"Error Boundary|Something went wrong|pageerror|ReferencedSOPSequence|"
        r"Cannot (read|destructure)|not currently supported|Unable to generate tool state",
        re.IGNORECASE,
    )
    return [line for line in console if bad.search(line) or line.startswith("error:")]


def _open_series(viewer: Viewer, description: str) -> None:
    viewer.page.get_by_text(description, exact=False).first.dblclick()
    viewer.page.wait_for_timeout(2500)


def _viewport_text(viewer: Viewer) -> str:
    """All text of the viewport, SVG annotation labels included (also where they run past its
    edge: OHIF puts a label right of its outline, outside the image for a body outline)."""
    return str(viewer.page.locator("[data-cy=viewport-pane]").first.text_content())


def _wait_for_measurement_text(viewer: Viewer, seconds: float = 30.0) -> str:
    """The viewport's text once OHIF has drawn a finding's measurement labels (or at timeout)."""
    text = ""
    for _ in range(int(seconds * 4)):
        text = _viewport_text(viewer)
        if "Volume:" in text:
            return text
        viewer.page.wait_for_timeout(250)
    return text


def _arrow(viewer: Viewer, side: str) -> None:
    viewer.page.locator(f"[data-cy=viewport-action-arrows-{side}]").first.click()
    viewer.page.wait_for_timeout(800)


def _step_through_findings(viewer: Viewer, description: str, count: int) -> list[str]:
    """The viewport's text for each of the SR's ``count`` findings (OHIF's < > arrows)."""
    seen = []
    for i in range(count):
        if i:
            _arrow(viewer, "right")
        text = _wait_for_measurement_text(viewer, 20.0)
        if "Volume:" not in text:
            # On a CPU-starved machine OHIF 3.13 sometimes shows an SR's image before its
            # annotation layer is ready and does not draw that finding until it is shown again;
            # the test goes to the next finding and back (or reopens a one-finding SR), as a
            # user would, and logs it.
            viewer.console.append(f"test: {description} finding {i + 1} not drawn, shown again")
            print(f"{description}: finding {i + 1} not drawn at first, shown again")
            if count > 1:
                away, back = ("left", "right") if i else ("right", "left")
                _arrow(viewer, away)
                _arrow(viewer, back)
            else:
                _open_series(viewer, description)
            text = _wait_for_measurement_text(viewer)
        seen.append(text)
    return seen


def test_every_sr_loads_and_shows_its_findings_with_measurements(
    viewer: tuple[Viewer, Study], screenshots: Path,
) -> None:
    """Each SR opens without an error and draws each finding with its measurements."""
    view, study = viewer
    nodules = study.predictions["ct-lung-nodules"]
    assert [s.tracking_id for s in nodules.segments] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    for key, shot in (
        ("foreground", None),
        ("ct-tissue", "ohif-sr-ct-tissue.png"),
        ("ct-lung-nodules", "ohif-sr-nodules.png"),
    ):
        prediction = study.predictions[key]
        view.fresh()
        before = len(view.console)
        _open_series(view, f"AI SR {key} 1.0.0")
        texts = _step_through_findings(view, f"AI SR {key} 1.0.0", len(prediction.segments))
        assert _problems(view.console[before:]) == [], key
        assert "Something went wrong" not in view.page.inner_text("body")
        if not all("Volume:" in text for text in texts):
            ARTIFACTS.mkdir(exist_ok=True)
            view.page.screenshot(path=str(ARTIFACTS / f"ohif-{key}.png"))
            (ARTIFACTS / f"ohif-{key}-console.txt").write_text("\n".join(view.console[before:]))
        for text in texts:
            assert "Volume:" in text and " ml" in text, (key, text)
        if key == "ct-lung-nodules":
            for text in texts:
                assert "Diameter:" in text and " mm" in text and "Certainty of Finding:" in text
            # Distinct findings, each with its own values.
            assert len({re.search(r"Volume: ([\d.]+)", t).group(1) for t in texts}) == 3  # type: ignore[union-attr]
        if shot is not None:
            # Back to Nodule 1 (ct-lung-nodules) or to the lungs (ct-tissue) for the picture.
            back = len(texts) - 1 if key == "ct-lung-nodules" else len(texts) - 2
            for _ in range(back):
                view.page.locator("[data-cy=viewport-action-arrows-left]").first.click()
                view.page.wait_for_timeout(600)
            view.page.screenshot(path=str(screenshots / shot))
            check_png(screenshots / shot)


def test_sr_with_no_finding_loads_without_error(viewer: tuple[Viewer, Study], screenshots: Path) -> None:
    """The nodule model's SR on the nodule-free series (no measurement group) breaks nothing."""
    view, study = viewer
    assert study.predictions["ct-lung-nodules (no nodule)"].segments == []
    before = len(view.console)
    # Both SRs of ct-lung-nodules share the description: the second thumbnail is this one.
    view.page.get_by_text("AI SR ct-lung-nodules 1.0.0").nth(1).dblclick()
    view.page.wait_for_timeout(3000)
    assert _problems(view.console[before:]) == []
    assert "Something went wrong" not in view.page.inner_text("body")
    # The "No finding" frame is drawn on the middle image of the series without nodules.
    assert f"I:{56 // 2 + 1} " in _viewport_text(view)
    pixels, _ = _canvas_pixels(view)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    blue = pixels[..., 2] >= pixels[..., :2].max(axis=2)
    assert ((spread > 40) & ~blue).sum() > 500, "no annotation drawn"
    view.page.screenshot(path=str(screenshots / "ohif-sr-no-finding.png"))
    check_png(screenshots / "ohif-sr-no-finding.png")


def _canvas_pixels(view: Viewer) -> tuple[np.ndarray, dict[str, float]]:
    canvas = view.page.locator("[data-cy=viewport-pane] canvas").first
    box = canvas.bounding_box()
    assert box is not None
    png = view.page.screenshot(clip=box)
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(np.int16), box


def test_nodule_seg_overlays_the_nodule(viewer: tuple[Viewer, Study], screenshots: Path) -> None:
    """After loading the nodule SEG, segment-coloured pixels cover the nodule on the shown slice."""
    view, study = viewer
    view.fresh()
    before = len(view.console)
    _open_series(view, "AI SEG ct-lung-nodules 1.0.0")
    yes = view.page.get_by_role("button", name="Yes")
    if yes.count():
        yes.first.click()
    view.page.wait_for_timeout(4000)
    assert _problems(view.console[before:]) == []
    text = _viewport_text(view)
    match = re.search(r"I:\s*(\d+)\s*\((\d+)/(\d+)\)", view.page.inner_text("body"))
    assert match, text
    instance = int(match.group(1))
    k = next(i for i, ds in enumerate(study.sources) if int(ds.InstanceNumber) == instance)
    seg = study.seg["ct-lung-nodules"]
    nodules = study.predictions["ct-lung-nodules"].segments
    masks = np.zeros_like(nodules[0].mask[k])
    for s in nodules:
        masks |= s.mask[k]
    assert masks.any(), f"OHIF shows slice {k} without a nodule voxel"
    pixels, _ = _canvas_pixels(view)
    view.page.screenshot(path=str(screenshots / "ohif-seg-nodules.png"))
    check_png(screenshots / "ohif-seg-nodules.png")
    # Segment pixels: the CT is grey (r == g == b) and OHIF's own overlays (scroll bar, icons)
    # are blue; the nodule segments are orange, red and green.
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    blue = pixels[..., 2] >= pixels[..., :2].max(axis=2)
    coloured = (spread > 40) & ~blue
    assert coloured.sum() > 30, "no segment colour in the viewport"
    # Where the nodules are: fit the 128 x 160 slice into the canvas (OHIF scales to fit, centred).
    rows, cols = masks.shape
    h, w = pixels.shape[:2]
    scale = min(h / rows, w / cols)
    top, left = (h - rows * scale) / 2, (w - cols * scale) / 2
    ys, xs = np.nonzero(coloured)
    r = ((ys - top) / scale).astype(int)
    c = ((xs - left) / scale).astype(int)
    inside = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
    near = np.zeros_like(masks)
    grown = np.argwhere(masks)
    for dr in (-2, -1, 0, 1, 2):
        for dc in (-2, -1, 0, 1, 2):
            rr = np.clip(grown[:, 0] + dr, 0, rows - 1)
            cc = np.clip(grown[:, 1] + dc, 0, cols - 1)
            near[rr, cc] = True
    on_nodule = near[r[inside], c[inside]]
    assert on_nodule.mean() > 0.9, f"{on_nodule.mean():.2f} of the coloured pixels lie on a nodule"
    # ... and every nodule voxel of the slice is covered by colour.
    covered = np.zeros_like(masks)
    covered[r[inside], c[inside]] = True
    assert covered[masks].mean() > 0.8
    del seg
