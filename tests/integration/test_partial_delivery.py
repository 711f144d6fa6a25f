"""Partial delivery: a destination that refuses a result class at negotiation gets the others.

A real DCMTK ``storescp`` with an association negotiation profile (``-xf``) listing every result
class except Segmentation Storage plays the archive without SEG; a plain ``storescp`` accepts all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import SegmentationStorage

from dicom_node.delivery.dicom import RESULT_CLASSES, capabilities
from dicom_node.settings import DestinationSettings
from tests.conftest import require_tool
from tests.integration.test_faults import catalog_of, rule, series_files, storescu, wait_job
from tests.support import procs
from tests.support.node import node_config, start_node

#: storescp's negotiation profile: every result class (and Verification) but Segmentation Storage.
NO_SEG_PROFILE = "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = 1.2.840.10008.1.2.1\n" \
    "TransferSyntax2 = 1.2.840.10008.1.2\n\n[[PresentationContexts]]\n[ResultsWithoutSeg]\n" + "".join(
        f"PresentationContext{i} = {uid}\\Uncompressed\n"
        for i, uid in enumerate([*(u for u in RESULT_CLASSES if u != SegmentationStorage), "1.2.840.10008.1.1"], 1)
    ) + "\n[[Profiles]]\n[NoSeg]\nPresentationContexts = ResultsWithoutSeg\n"


def start_storescp_without_seg(workdir: Path) -> procs.Server:
    """``storescp`` that accepts every result class except Segmentation Storage."""
    require_tool("storescp")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "noseg.cfg"
    cfg.write_text(NO_SEG_PROFILE)
    out = workdir / "received"
    out.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    proc, log = procs._spawn(
        ["storescp", "--aetitle", "NOSEG", "--output-directory", str(out), "-xf", str(cfg), "NoSeg", str(port)],
        workdir, "storescp.log",
    )
    procs.wait_for_port(port, proc=proc)
    return procs.Server(proc, port, workdir, log, {"received": str(out), "ae_title": "NOSEG"})


def _received_uids(server: procs.Server) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in Path(server.extra["received"]).iterdir() if p.is_file()}


def test_capabilities_report_the_refused_class(tmp_path: Path) -> None:
    """Each result class is proposed; only Segmentation Storage is reported refused."""
    server = start_storescp_without_seg(tmp_path / "noseg")
    try:
        dest = DestinationSettings(name="noseg", ae_title="NOSEG", host=procs.LOOPBACK, port=server.port)
        accepted = capabilities(dest, calling_ae_title="DICOM_NODE")
    finally:
        server.stop()
    assert list(accepted) == list(RESULT_CLASSES)
    assert {uid for uid, ok in accepted.items() if not ok} == {SegmentationStorage}


def test_a_refused_seg_does_not_block_the_sr(tmp_path: Path) -> None:
    """End to end: the archive without SEG gets the SR, GSPS, KOS and SCs (the default outputs),
    the SEG is recorded refused, the job is done; an archive that accepts all gets every object;
    ``jobs --json`` and ``echo --capabilities`` say so."""
    noseg = start_storescp_without_seg(tmp_path / "noseg")
    full = procs.start_storescp(tmp_path / "full", ae_title="FULL")
    workdir = tmp_path / "node"
    node = None
    try:
        destinations = [
            {"name": "noseg", "ae_title": "NOSEG", "host": procs.LOOPBACK, "port": noseg.port},
            {"name": "full", "ae_title": "FULL", "host": procs.LOOPBACK, "port": full.port},
        ]
        node = start_node(workdir, node_config(workdir, idle_seconds=0.5, destinations=destinations,
                                                rules=[rule("ct", "ct-tissue", ["noseg", "full"])]))
        storescu(node.port, series_files(tmp_path, "partial-e2e"))
        from dicom_node.demo import SeriesInfo

        catalog = catalog_of(node)
        job = wait_job(node, catalog, SeriesInfo(seed="partial-e2e").uid("series"), ("done", "failed"))
        assert job.state == "done", job.reason
        seg, sr = job.results["seg_sop_instance_uid"], job.results["sr_sop_instance_uid"]
        every = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in job.results["files"]}
        assert {seg, sr} < every and len(every) >= 5  # SEG, SR, GSPS, KOS and at least one SC
        assert _received_uids(noseg) == every - {seg}
        assert _received_uids(full) == every

        by_dest = {d.destination: d for d in catalog.deliveries(job.id)}
        assert by_dest["noseg"].state == "done" and by_dest["full"].state == "done"
        noseg_objects = {o["sop_instance_uid"]: o for o in by_dest["noseg"].objects}
        assert noseg_objects[seg]["outcome"] == "refused"
        assert noseg_objects[seg]["detail"] == "refused: Segmentation Storage not accepted"
        assert noseg_objects[seg]["sop_class"] == "Segmentation Storage"
        assert noseg_objects[sr]["outcome"] == "sent" and noseg_objects[sr]["status"] == 0
        assert {o["outcome"] for o in by_dest["full"].objects} == {"sent"}

        cli = [sys.executable, "-m", "dicom_node"]
        listing = subprocess.run([*cli, "jobs", "--config", str(node.config_path), "--json"],
                                 capture_output=True, text=True, check=True, timeout=60)
        [entry] = json.loads(listing.stdout)
        deliveries = {d["destination"]: d for d in entry["deliveries"]}
        assert [o["detail"] for o in deliveries["noseg"]["objects"] if o["outcome"] == "refused"] == [
            "refused: Segmentation Storage not accepted"]
        text = subprocess.run([*cli, "jobs", "--config", str(node.config_path)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
        assert f"noseg: done, 1 refused, {len(every) - 1} sent (refused: Segmentation Storage not accepted)" in text
        caps = subprocess.run([*cli, "echo", "noseg", "--capabilities", "--config", str(node.config_path), "--json"],
                              capture_output=True, text=True, check=True, timeout=60)
        refused = [c["name"] for c in json.loads(caps.stdout)["classes"] if not c["accepted"]]
        assert refused == ["Segmentation Storage"]
    finally:
        if node is not None:
            node.stop()
        noseg.stop()
        full.stop()
