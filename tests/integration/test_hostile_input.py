"""A corpus of hostile instances sent to a real ``dicom-node serve`` over one association each.

Every file is sent by a pynetdicom SCU as raw bytes (the dataset is never decoded on our side),
so the node sees exactly the broken bytes.  Each gets a named refusal status, or is stored and
ends in a ``failed`` job with a readable reason; the node keeps serving and processes a good
series sent at the end.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from dicom_node.catalog import Catalog
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset bytes) of a Part 10 file."""
    end = 144 + int.from_bytes(data[140:144], "little")
    return data[:end], data[end:]


def _series(seed: str, slices: int = 3) -> list[pydicom.Dataset]:
    phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=slices))
    return slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=seed))


def _one(seed: str) -> pydicom.Dataset:
    return _series(seed, 1)[0]


def corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (Part 10 bytes, SOP class to propose): the hostile instances."""
    out: dict[str, tuple[bytes, str]] = {}
    meta, body = _split(_bytes(_one("h-trunc-header")))
    out["truncated in the header"] = (meta + body[:7], CTImageStorage)
    out["garbage bytes"] = (meta + bytes(range(256)) * 8, CTImageStorage)
    meta, body = _split(_bytes(_one("h-2gb")))
    i = body.find(b"\x08\x00\x05\x00CS")  # SpecificCharacterSet, the first element
    out["2 GB declared length"] = (meta + body[:i] + b"\x08\x00\x05\x00OB\x00\x00" + struct.pack("<I", 0x7FFFFFFE)
                                   + body[i + 8:], CTImageStorage)
    ds = _one("h-dotdot")
    ds.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    out["UID with ../"] = (_bytes(ds), CTImageStorage)
    ds = _one("h-long")
    ds.StudyInstanceUID = "1.2." + "3" * 70
    out["UID over 64 characters"] = (_bytes(ds), CTImageStorage)
    ds = _one("h-class")
    out["SOP class not the negotiated one"] = (_bytes(ds), MRImageStorage)
    ds = _one("h-nouid")
    del ds.SOPInstanceUID
    out["no SOP Instance UID"] = (_bytes(ds), CTImageStorage)
    # Issue 18, item 13: each of these was answered Success before the whole data set was
    # walked in the negotiated syntax and UIDs were matched with fullmatch.
    meta, body = _split(_bytes(_one("h-newline")))  # pydicom strips the newline: edit the bytes
    i = body.find(b"\x20\x00\x0e\x00UI")  # SeriesInstanceUID
    length = struct.unpack_from("<H", body, i + 6)[0]
    uid = body[i + 8:i + 8 + length].rstrip(b"\x00") + b"\n"
    uid += b"\x00" * (len(uid) % 2)
    out["UID ending in a newline"] = (meta + body[:i + 6] + struct.pack("<H", len(uid)) + uid
                                      + body[i + 8 + length:], CTImageStorage)
    meta, body = _split(_bytes(_one("h-2gb-late")))
    i = body.find(b"\x20\x00\x13\x00IS")  # InstanceNumber, after the four UIDs
    assert i > body.find(b"\x20\x00\x0e\x00UI") > 0
    out["2 GB declared after the UIDs"] = (meta + body[:i] + b"\x20\x00\x13\x00UN\x00\x00"
                                           + struct.pack("<I", 0x7FFFFFFE) + body[i + 8:], CTImageStorage)
    ds = _one("h-implicit")
    meta, _ = _split(_bytes(ds))
    out["implicit VR data set on an explicit VR context"] = (meta + _implicit(ds), CTImageStorage)
    meta, body = _split(_bytes(_one("h-trunc-pixels")))
    out["pixel data cut short"] = (meta + body[:-700], CTImageStorage)
    return out


def _implicit(ds: pydicom.Dataset) -> bytes:
    """The data set encoded in implicit VR little endian (no file meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = True, True
    body = pydicom.Dataset()
    body.update({e.tag: e for e in ds})
    write_dataset(fp, body)
    return fp.getvalue()


#: What the node answers for each corpus entry (stored ones are checked through their jobs).
REFUSED = {
    "truncated in the header": 0xC210,
    "garbage bytes": 0xC210,
    "2 GB declared length": 0xC210,
    "UID with ../": 0xA900,
    "UID over 64 characters": 0xA900,
    "SOP class not the negotiated one": 0xA900,
    "no SOP Instance UID": 0xA900,
    "UID ending in a newline": 0xA900,
    "2 GB declared after the UIDs": 0xC210,
    "implicit VR data set on an explicit VR context": 0xC210,
    "pixel data cut short": 0xC210,
}


def stored_but_unusable(tmp: Path) -> dict[str, list[bytes]]:
    """Series the listener must store (well-formed data sets) that no model can use: their jobs
    fail.  (Pixel data cut short is no longer among them: the whole data set must parse in
    the negotiated syntax before Success, so it is refused 0xC210 - issue 18, item 13.)"""
    out: dict[str, list[bytes]] = {}
    out["h-nopixels"] = []
    for ds in _series("h-nopixels"):
        del ds.PixelData
        out["h-nopixels"].append(_bytes(ds))
    out["h-matrix"] = []
    for ds in _series("h-matrix"):
        ds.Rows = 64  # the pixel data holds 32 x 32
        out["h-matrix"].append(_bytes(ds))
    out["h-wrong-vr"] = []
    for ds in _series("h-wrong-vr"):
        data = _bytes(ds)
        i = data.find(b"\x28\x00\x30\x00DS")  # PixelSpacing: DS -> US (2 bytes of garbage)
        out["h-wrong-vr"].append(data[:i] + b"\x28\x00\x30\x00US" + data[i + 6:])
    return out


def send_raw(port: int, data: bytes, sop_class: str, tmp: Path) -> int:
    """C-STORE the dataset bytes of ``data`` unchanged; return the status (-1: no response)."""
    path = tmp / "raw.dcm"
    path.write_bytes(data)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send file bytes, never decode them
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(build_context(sop_class, [EXPLICIT_LE]).abstract_syntax, EXPLICIT_LE)
    assoc = ae.associate(procs.LOOPBACK, port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        # pynetdicom takes the affected SOP class/instance from the file meta, the bytes from disk.
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else -1
    finally:
        assoc.release()


def _with_meta_class(data: bytes, sop_class: str) -> bytes:
    """Rewrite the MediaStorageSOPClassUID so pynetdicom proposes ``sop_class`` for the bytes."""
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
    old = str(ds.file_meta.MediaStorageSOPClassUID).encode()
    new = sop_class.encode()
    assert len(old) == len(new)
    return data.replace(old, new, 1)


def test_hostile_corpus_gets_named_statuses_and_node_keeps_serving(tmp_path: Path) -> None:
    """Each broken instance is refused with 0xC210/0xA900 or stored and its job failed with a
    reason; nothing escapes the spool; the node then processes a good series."""
    workdir = tmp_path / "node"
    rules = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": []}]
    node = start_node(workdir, node_config(workdir, idle_seconds=0.5, rules=rules))
    try:
        for name, (data, sop_class) in corpus().items():
            if sop_class != CTImageStorage:
                data = _with_meta_class(data, sop_class)
            status = send_raw(node.port, data, sop_class, tmp_path)
            assert status == REFUSED[name], f"{name}: got 0x{status:04X}"
        assert node.server.proc.poll() is None
        assert not (workdir.parent / "evil").exists() and not Path("/tmp/evil").exists()  # noqa: S108 - the target
        spool = workdir / "spool"
        written = [p for p in spool.rglob("*") if p.is_file()]
        assert written == [], "a refused instance was written"

        unusable = stored_but_unusable(tmp_path)
        for instances in unusable.values():
            for data in instances:
                assert send_raw(node.port, data, CTImageStorage, tmp_path) == 0x0000
        good = write_datasets(_series("h-good", 12), tmp_path / "good")
        for path in good:
            assert send_raw(node.port, path.read_bytes(), CTImageStorage, tmp_path) == 0x0000

        catalog = Catalog(f"sqlite:///{workdir / 'node.db'}")

        def settled() -> list[object] | None:
            jobs = catalog.list_jobs()
            return jobs if len(jobs) == len(unusable) + 1 and all(j.state in ("done", "failed") for j in jobs) else None

        jobs = {j.series_instance_uid: j for j in wait_until(settled, 120, what="all jobs settled")}
        for seed in unusable:
            job = jobs[SeriesInfo(seed=seed).uid("series")]
            assert job.state == "failed" and job.reason, (seed, job.state)
            assert job.attempts == 1, f"{seed}: unusable input must not be retried ({job.reason})"
        good_job = jobs[SeriesInfo(seed="h-good").uid("series")]
        assert good_job.state == "done", good_job.reason
        assert node.server.proc.poll() is None
    finally:
        node.stop()
