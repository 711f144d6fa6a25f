"""No patient name, ID or birth date in any log line, on the whole path with real processes.

Series full of distinctive PHI go through a real ``dicom-node serve`` (JSON logs) and its worker:
a good CT processed and delivered, an MR routed to a CT model (failed job), a series whose pixel
data does not match its matrix (failed on load), an instance refused by the listener, and PHI
values pydicom itself finds invalid (its warnings quote values).  The node's and the worker's
log files, and the catalog, must hold none of the strings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "Quxworthy^Zebulonia"
PATIENT_ID = "PID-93817465-ZQ"
BIRTH_DATE = "19230417"
OTHER_ID = "OTHERID-5550172"
ADDRESS = "17 Wobbleford Lane"
#: A name pydicom finds invalid (control character): its warnings quote such values.
BAD_NAME = "Snorkelbeard\x07^Ignatius"
PHI = (NAME, PATIENT_ID, BIRTH_DATE, OTHER_ID, ADDRESS, "Snorkelbeard", "Zebulonia", "93817465")


def _series(tmp: Path, seed: str, *, modality: str = "CT", name: str = NAME, slices: int = 12,
            break_matrix: bool = False) -> list[Path]:
    phantom = make_chest_phantom(ChestSpec(slices=slices))
    info = SeriesInfo(seed=seed, modality=modality, patient_name=name, patient_id=PATIENT_ID,
                      patient_birth_date=BIRTH_DATE)
    datasets = slice_datasets(phantom.hu, phantom.affine, info)
    for ds in datasets:
        ds.OtherPatientIDs = OTHER_ID
        ds.PatientAddress = ADDRESS
        if break_matrix:
            ds.Rows = 200
    return write_datasets(datasets, tmp / seed)


def test_no_phi_in_node_and_worker_logs(tmp_path: Path) -> None:
    """Names, IDs, birth dates and addresses of the patients appear in no log line of the node
    or its worker, nor in the catalog, while UIDs and AE titles do."""
    require_tool("storescu", "storescp")
    archive = procs.start_storescp(tmp_path / "archive")
    workdir = tmp_path / "node"
    rules = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": ["archive"]},
             {"name": "mr", "match": {"Modality": "MR"}, "models": ["ct-tissue"], "destinations": ["archive"]}]
    dest = {"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}
    config = node_config(workdir, idle_seconds=0.5, destinations=[dest], rules=rules)
    node = start_node(workdir, config)
    try:
        sent = {
            "good": _series(tmp_path, "phi-good"),
            "mr": _series(tmp_path, "phi-mr", modality="MR", slices=4),
            "matrix": _series(tmp_path, "phi-matrix", slices=4, break_matrix=True),
            "badname": _series(tmp_path, "phi-badname", name=BAD_NAME, slices=12),
        }
        for files in sent.values():
            res = procs.run_tool(["storescu", "-aet", "PACS", "-aec", "DICOM_NODE", procs.LOOPBACK, str(node.port),
                                  *map(str, files)], timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
        refused = procs.run_tool(["storescu", "-aet", "PACS", "-aec", "NOT_THE_NODE", procs.LOOPBACK,
                                  str(node.port), str(sent["good"][0])])
        assert refused.returncode != 0
        catalog = Catalog(f"sqlite:///{workdir / 'node.db'}")

        def settled() -> list[object] | None:
            jobs = catalog.list_jobs()
            return jobs if len(jobs) == 4 and all(j.state in ("done", "failed") for j in jobs) else None

        jobs = {j.series_instance_uid: j for j in wait_until(settled, 120, what="four jobs settled")}
        states = {k: jobs[SeriesInfo(seed=f"phi-{k}").uid("series")].state for k in sent}
        assert states == {"good": "done", "mr": "failed", "matrix": "failed", "badname": "done"}, states
        catalog.close()
    finally:
        node.stop()
        archive.stop()

    logs = {p.name: p.read_text(errors="replace") for p in workdir.glob("*.log")}
    text = "\n".join(logs.values())
    # The logs did capture the path (so an empty log cannot pass): UIDs and AE titles are there.
    assert SeriesInfo(seed="phi-good").uid("series") in text
    assert '"calling_ae_title": "PACS"' in text and "job_done" in text and "job_failed" in text
    leaks = [(name, s) for name, body in logs.items() for s in PHI if s in body]
    assert leaks == [], leaks
    for db in workdir.glob("node.db*"):
        data = db.read_bytes()
        assert not [s for s in PHI if s.encode() in data], f"PHI stored in {db.name}"
