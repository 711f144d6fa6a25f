"""Per-destination outputs and the "not applied" notice, end to end with real processes:
storescu → dicom-node → worker → two DCMTK storescp archives with different ``outputs``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.results.common import series_slot
from tests.integration.test_end_to_end import archived, storescu
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SC = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


Archives = tuple[procs.Server, procs.Server, procs.Server]


@pytest.fixture
def archives(tmp_path: Path, tool: Callable[..., None]) -> Iterator[Archives]:
    """A PACS with the default outputs, a second archive taking only SR and GSPS, a third
    taking only secondary captures and no notice."""
    tool("storescp", "storescu")
    servers = [procs.start_storescp(tmp_path / name, ae_title=name.upper()) for name in ("pacs", "second", "quiet")]
    try:
        yield servers[0], servers[1], servers[2]
    finally:
        for server in servers:
            server.stop()


def by_series(got: dict[str, list[pydicom.Dataset]], study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    return {cls: [d for d in ds if d.StudyInstanceUID == study_uid] for cls, ds in got.items()}


@pytest.mark.slow
def test_each_destination_gets_its_outputs_and_a_refused_series_a_notice(
    tmp_path: Path, archives: Archives, dciodvfy_clean: Callable[[Path], list[str]]
) -> None:
    """The PACS (default outputs) receives SEG, SR, GSPS, KOS and SC of the CT series in the
    model's own Series Numbers, and for the MR series the model refuses a notice SR + SC; the
    second archive (outputs sr, gsps) receives only the SR and GSPS, and the notice SR without
    its SC; the third (outputs sc, notify_not_applied false) only the SCs; everything received
    passes dciodvfy."""
    pacs, second, quiet = archives
    phantom = make_chest_phantom(ChestSpec())
    ct_info = SeriesInfo(seed="outputs-ct")
    mr_info = SeriesInfo(seed="outputs-mr", modality="MR", study_uid=ct_info.uid("study") + "9")
    ct_files = write_datasets(slice_datasets(phantom.hu, phantom.affine, ct_info), tmp_path / "ct")
    mr_files = write_datasets(slice_datasets(phantom.hu[:5], phantom.affine, mr_info), tmp_path / "mr")
    destinations = [
        {"name": "pacs", "ae_title": "PACS", "host": procs.LOOPBACK, "port": pacs.port},
        {"name": "second", "ae_title": "SECOND", "host": procs.LOOPBACK, "port": second.port,
         "outputs": ["sr", "gsps"]},
        {"name": "quiet", "ae_title": "QUIET", "host": procs.LOOPBACK, "port": quiet.port,
         "outputs": ["sc"], "notify_not_applied": False},
    ]
    rules = [{"name": "all", "match": {}, "models": ["ct-tissue"], "destinations": ["pacs", "second", "quiet"]}]
    # Retries as in production: under CPU load a storescp can miss the 30 s response deadline once.
    config = node_config(tmp_path / "node", destinations=destinations, rules=rules,
                         delivery={"max_attempts": 3, "backoff_seconds": 0.5})
    node = start_node(tmp_path / "node", config)
    try:
        storescu(node.port, ct_files)
        storescu(node.port, mr_files)
        catalog = Catalog(f"sqlite:///{tmp_path / 'node' / 'node.db'}")

        def settled() -> list[object] | None:
            jobs = catalog.list_jobs()
            return jobs if len(jobs) == 2 and all(j.state in ("done", "failed") for j in jobs) else None

        try:
            jobs = {j.series_instance_uid: j for j in wait_until(settled, 180, what="both jobs settled")}
        except TimeoutError:
            pytest.fail(f"jobs did not settle; node logs:\n{node.logs()[-8000:]}")
        ct_job, mr_job = jobs[ct_info.uid("series")], jobs[mr_info.uid("series")]
        assert ct_job.state == "done", ct_job.reason
        assert mr_job.state == "failed" and "MR" in (mr_job.reason or "")
        n_sc = ct_job.results["outputs"]["sc"]  # one per region's largest section, at most 4
        assert ct_job.results["outputs"] == {"seg": 1, "sr": 1, "gsps": 1, "sc": n_sc, "kos": 1} and n_sc >= 1

        def notices_in(archive: procs.Server) -> dict[str, list[pydicom.Dataset]] | None:
            got = by_series(archived(archive), mr_info.uid("study"))
            return got if got.get(ENHANCED_SR) else None

        pacs_mr = wait_until(lambda: notices_in(pacs), 30, what="notice at the PACS")
        second_mr = wait_until(lambda: notices_in(second), 30, what="notice at the second archive")
        pacs_ct = by_series(archived(pacs), ct_info.uid("study"))
        second_ct = by_series(archived(second), ct_info.uid("study"))
        quiet_all = archived(quiet)
    finally:
        node.stop()

    assert {c: len(d) for c, d in pacs_ct.items() if d} == {SEG: 1, SR: 1, GSPS: 1, KOS: 1, SC: n_sc}
    assert {c: len(d) for c, d in second_ct.items() if d} == {SR: 1, GSPS: 1}
    # Only its SCs, all of the CT study: no notice for the refused MR series.
    assert {c: len(d) for c, d in quiet_all.items() if d} == {SC: n_sc}
    assert {d.StudyInstanceUID for d in quiet_all[SC]} == {ct_info.uid("study")}
    block = 9000 + 10 * series_slot("ct-tissue")
    numbers = {c: int(d[0].SeriesNumber) for c, d in pacs_ct.items() if d}
    assert numbers == {SEG: block + 1, SR: block + 2, GSPS: block + 3, KOS: block + 4, SC: block + 5}

    assert {c: len(d) for c, d in pacs_mr.items() if d} == {ENHANCED_SR: 1, SC: 1}
    assert {c: len(d) for c, d in second_mr.items() if d} == {ENHANCED_SR: 1}
    notice = pacs_mr[ENHANCED_SR][0]
    comment = next(i.TextValue for i in notice.ContentSequence
                   if i.ConceptNameCodeSequence[0].CodeValue == "121106")
    assert comment.startswith("ct-tissue was not applied: ") and "MR" in comment
    assert int(notice.SeriesNumber) == block + 6 and int(pacs_mr[SC][0].SeriesNumber) == block + 7

    manifest = json.loads((tmp_path / "node" / "outbox" / f"job-{ct_job.id}" / "manifest.json").read_text())
    assert sorted(m["output"] for m in manifest["files"]) == sorted(["gsps", "kos", "seg", "sr"] + ["sc"] * n_sc)
    for got in (pacs_ct, second_ct, pacs_mr, second_mr):
        for datasets in got.values():
            for ds in datasets:
                dciodvfy_clean(ds.filename)
