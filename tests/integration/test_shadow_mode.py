"""Shadow mode end to end with real processes: storescu → dicom-node (live rule + shadow rule on
CT) → worker → a DCMTK storescp archive; ``dicom-node shadow report``; a promotion at restart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicom_node.catalog import Catalog
from dicom_node.catalog import shadow as shadow_store
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.integration.test_end_to_end import SEG_CLASS, archived, storescu
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until
from tests.unit.test_results_seg import masks_by_slice
from tests.unit.test_user_models import BONE_LEVEL, CARD, BoneThreshold

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]


class SmoothBone(torch.nn.Module):
    """Another bone model: the threshold of the 3x3x3 mean, so its edges differ from
    :class:`BoneThreshold`'s (same label, a Dice below 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([torch.full((1, 1, 3, 3, 3), 50.0 / 27),
                                              torch.full((1, 1, 3, 3, 3), -50.0 / 27)]))
            self.conv.bias.copy_(torch.tensor([-50.0 * BONE_LEVEL, 50.0 * BONE_LEVEL]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def bone_model(folder: Path, name: str, network: torch.nn.Module | None = None) -> dict[str, str]:
    """A bone network (default the unit tests' threshold) as a TorchScript model folder named
    ``name``: two folders with the same weights are the same model under two names."""
    folder.mkdir(parents=True)
    torch.jit.script(network or BoneThreshold()).save(str(folder / "model.pt"))
    card = CARD.format(spacing='"native"', orientation="native", patch="[16, 32, 32]", overlap=0.25)
    (folder / "model.toml").write_text(card.replace('name = "ct-bone-threshold"', f'name = "{name}"', 1))
    return {"name": name, "path": str(folder)}


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def seg_mask(path: str, label: str, sources: list[pydicom.Dataset], shape: tuple[int, ...]) -> np.ndarray:
    """The mask of the segment labelled ``label`` (case-insensitive), rebuilt from the SEG frames."""
    seg = hd.seg.segread(path)
    numbers = {seg.get_segment_description(n).segment_label.lower(): n for n in seg.segment_numbers}
    masks = masks_by_slice(seg, sources, [(k, 1) for k in range(len(sources))], shape)
    return masks[numbers[label.lower()]]


def cli(config: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dicom_node", *args, "--config", str(config)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_shadow_results_stay_in_the_node_and_the_report_shows_their_agreement(
    tmp_path: Path, tool: Callable[..., None]
) -> None:
    """Live rule: bone-live → archive.  Shadow rule (naming the archive too): bone-shadow (the
    same network under another name) and bone-smooth (another network).  The archive receives exactly the live
    model's objects (SEG, SR, GSPS, KOS, SC); the shadow jobs end ``done (shadow)`` with their results in the outbox and
    no delivery; the report gives Dice 1.0 for the twin and, for bone-smooth, the Dice of its bone
    against bone-live's computed here with numpy from the two SEGs; a restart with the shadow
    rule made live records the promotion."""
    tool("storescp", "storescu")
    phantom = make_chest_phantom(ChestSpec(rows=48, columns=48, slices=16, pixel_spacing=7.0, slice_spacing=10.0))
    info = SeriesInfo(seed="shadow-ct")
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "ct")
    models = [bone_model(tmp_path / "models" / "live", "bone-live"),
              bone_model(tmp_path / "models" / "shadow", "bone-shadow"),
              bone_model(tmp_path / "models" / "smooth", "bone-smooth", SmoothBone())]
    archive = procs.start_storescp(tmp_path / "pacs", ae_title="PACS")
    destinations = [{"name": "pacs", "ae_title": "PACS", "host": procs.LOOPBACK, "port": archive.port}]
    rules = [
        {"name": "ct", "match": {"Modality": "CT"}, "models": ["bone-live"], "destinations": ["pacs"]},
        {"name": "ct-trial", "match": {"Modality": "CT"}, "models": ["bone-shadow", "bone-smooth"],
         "destinations": ["pacs"], "mode": "shadow"},
    ]
    workdir = tmp_path / "node"
    config = node_config(workdir, destinations=destinations, rules=rules,
                         delivery={"max_attempts": 3, "backoff_seconds": 0.5})
    config["models"] = models
    node = start_node(workdir, config)
    catalog = Catalog(f"sqlite:///{workdir / 'node.db'}")
    try:
        storescu(node.port, files)

        def settled() -> list[object] | None:
            jobs = catalog.list_jobs()
            return jobs if len(jobs) == 3 and all(j.state in ("done", "failed") for j in jobs) else None

        try:
            jobs = {j.model: j for j in wait_until(settled, 240, what="three jobs settled")}
            wait_until(lambda: len(shadow_store.comparisons(catalog)) == 2, 30, what="two comparisons")
        except TimeoutError:
            pytest.fail(f"shadow jobs did not settle; node logs:\n{node.logs()[-8000:]}")
        held = archived(archive)
        jobs_text = cli(node.config_path, "jobs")
    finally:
        node.stop()
        archive.stop()

    live, twin, smooth = jobs["bone-live"], jobs["bone-shadow"], jobs["bone-smooth"]
    assert [j.state for j in (live, twin, smooth)] == ["done"] * 3, [j.reason for j in jobs.values()]
    assert (live.mode, twin.mode, smooth.mode) == ("live", "shadow", "shadow")
    # The archive holds the live model's SEG + SR and nothing else.
    held_uids = {str(d.SOPInstanceUID) for ds in held.values() for d in ds}
    def uids(job: object) -> set[str]:
        return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in job.results["files"]}  # type: ignore[attr-defined]

    assert held_uids == uids(live) and live.results["seg_sop_instance_uid"] in held_uids
    for job in (twin, smooth):
        assert job.destinations == [] and catalog.deliveries(job.id) == []
        assert job.delivering_at is None and job.state_label == "done (shadow)"
        assert not held_uids & uids(job)
        # Kept in the node: the encoded results and the saved prediction.
        assert all(Path(f).exists() for f in job.results["files"]) and len(job.results["files"]) == 2
        assert Path(job.results["prediction"]).exists()
    assert [d.state for d in catalog.deliveries(live.id)] == ["done"]
    assert sum("done (shadow)" in line for line in jobs_text.splitlines()) == 2, jobs_text

    # Independent check: bone-smooth's bone (its SEG kept in the outbox) against bone-live's
    # (the SEG the archive holds), decoded frame by frame and compared with numpy.
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    (live_seg,) = held[SEG_CLASS]
    live_bone = seg_mask(live_seg.filename, "bone", sources, phantom.hu.shape)  # type: ignore[arg-type]
    (smooth_seg,) = [f for f in smooth.results["files"] if Path(f).name.startswith("seg-")]
    smooth_bone = seg_mask(smooth_seg, "bone", sources, phantom.hu.shape)
    expected = numpy_dice(smooth_bone, live_bone)
    assert 0.2 < expected < 1.0  # two different models: a real figure, not a trivial one

    report = json.loads(cli(node.config_path, "shadow", "report", "--format", "json"))
    pairs = {(p["shadow_model"], p["live_model"]): p for p in report["pairs"]}
    assert set(pairs) == {("bone-shadow", "bone-live"), ("bone-smooth", "bone-live")}
    assert pairs[("bone-shadow", "bone-live")]["mean_dice"] == 1.0
    assert pairs[("bone-shadow", "bone-live")]["series"] == 1
    (row,) = pairs[("bone-smooth", "bone-live")]["series_list"]
    assert row["basis"] == "labels" and set(row["dice_per_label"]) == {"Bone"}
    assert row["dice"] == pytest.approx(expected, abs=1e-4)
    assert row["volumes_ml"]["live"]["Bone"] == pytest.approx(live_bone.sum() * 7.0 * 7.0 * 10.0 / 1000, rel=1e-3)
    text = cli(node.config_path, "shadow", "report", "--model", "bone-smooth")
    assert "shadow bone-smooth  vs  live bone-live" in text and f"mean Dice {expected:.3f}" in text, text
    assert "bone-shadow" not in text

    # Promotion: the same node started with the shadow rule made live records the change.
    rules[1]["mode"] = "live"
    promoted = node_config(workdir, port=int(config["listener"]["port"]), destinations=destinations, rules=rules)
    node = start_node(workdir, {**promoted, "models": models})
    node.stop()
    text = cli(node.config_path, "shadow", "report", "--summary")
    assert "rule ct-trial (bone-shadow,bone-smooth) promoted to live (was shadow)" in text, text
