"""The listener against real DCMTK senders (storescu, echoscu) and a pynetdicom SCU."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.delivery.dicom import send_instances
from dicom_node.demo import ChestSpec, SeriesInfo, write_chest_series
from dicom_node.errors import PermanentError, TransientError
from dicom_node.ingest.listener import IMPLEMENTATION_CLASS_UID, Listener
from dicom_node.ingest.spool import Spool
from dicom_node.settings import DestinationSettings, ListenerSettings, StorageSettings
from tests.conftest import require_tool
from tests.support import procs
from tests.support.sinks import CollectingSink

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = "1.2.826.0.1.3680043.8.498.77.1"


def dataset_part(path: Path) -> bytes:
    """The bytes after the File Meta Information group (which every writer re-creates)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length comes first
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


class Node:
    """A running listener with its sink and spool root."""

    def __init__(self, root: Path, **listener: Any) -> None:
        min_free_mb = listener.pop("min_free_mb", 0)
        self.storage = StorageSettings(root=root / "spool", min_free_mb=min_free_mb)
        self._sink = CollectingSink()
        self.settings = ListenerSettings(port=procs.free_port(), **listener)
        self.listener = Listener(self.settings, Spool(self.storage.root), self._sink, self.storage)
        self.listener.start()

    @property
    def sink(self) -> CollectingSink:
        """The sink (told of every instance before its C-STORE response)."""
        assert self.listener.flush()
        return self._sink

    def spool_files(self) -> list[Path]:
        """Every file in the spool (instances, leftovers)."""
        return [p for p in self.root.rglob("*") if p.is_file()]

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def root(self) -> Path:
        return self.storage.root

    def destination(self) -> DestinationSettings:
        return DestinationSettings(
            name="node", ae_title=self.settings.ae_title, host="127.0.0.1", port=self.port
        )

    def wait_associations(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.sink.associations) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.sink.associations) >= n, "association_ended was not reported"


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``make_node(**listener_settings)`` starts a listener; all are stopped in teardown."""
    nodes: list[Node] = []

    def make(**listener: Any) -> Node:
        node = Node(tmp_path / f"node{len(nodes)}", **listener)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.listener.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small phantom CT series (8 slices, Explicit VR Little Endian)."""
    out = tmp_path_factory.mktemp("series")
    _, paths = write_chest_series(
        out,
        ChestSpec(rows=64, columns=64, slices=8),
        SeriesInfo(study_uid=STUDY, series_uid=SERIES),
    )
    return sorted(paths)


def storescu(port: int, files: list[Path], *args: str, called: str = "DICOM_NODE") -> str:
    require_tool("storescu")
    res = procs.run_tool(
        ["storescu", "-v", "-nh", "-aec", called, *args, "127.0.0.1", str(port), *map(str, files)],
        nodelay=False,
    )
    return res.stdout + res.stderr


def test_echo_answers_success(make_node: Callable[..., Node]) -> None:
    """A C-ECHO from DCMTK echoscu succeeds."""
    require_tool("echoscu")
    node = make_node()
    res = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_series_is_spooled_byte_identical(
    make_node: Callable[..., Node], series: list[Path]
) -> None:
    """Every instance lands in root/<Study>/<Series>/<SOP>.dcm with the dataset bytes as sent."""
    node = make_node()
    out = storescu(node.port, series)
    assert "Store Failed" not in out, out
    assert len(node.sink.instances) == len(series)
    for src in series:
        sop = dcmread(src, stop_before_pixels=True).SOPInstanceUID
        stored = node.root / STUDY / SERIES / f"{sop}.dcm"
        assert dataset_part(stored) == dataset_part(src)
        meta = dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPInstanceUID == sop
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.SourceApplicationEntityTitle == "STORESCU"
    first = node.sink.instances[0]
    assert first.study_instance_uid == STUDY
    assert first.series_instance_uid == SERIES
    assert first.calling_ae_title == "STORESCU"
    assert first.path.is_file() and first.size == first.path.stat().st_size
    assert first.attributes["Modality"] == "CT"
    assert first.attributes["ImagesInAcquisition"] == 8
    assert first.attributes["SliceThickness"] == pytest.approx(5.0)
    assert first.attributes["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert "PatientName" not in first.attributes


def test_several_senders_at_once_write_straight_to_the_spool(
    make_node: Callable[..., Node], series: list[Path]
) -> None:
    """One association, then three at once: every instance is fsync'd straight into the spool
    and reported, byte for byte what was sent."""
    node = make_node()
    storescu(node.port, series[:2])
    assert len(node.sink.instances) == 2
    ae = AE(ae_title="PARALLEL")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assocs = [ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE") for _ in range(3)]
    try:
        assert all(a.is_established for a in assocs)
        for n, path in enumerate(series[2:2 + 2 * len(assocs)]):
            status = assocs[n % len(assocs)].send_c_store(dcmread(path))
            assert status.Status == 0x0000
    finally:
        for a in assocs:
            a.release()
    stored = {i.sop_instance_uid for i in node.sink.instances}
    assert len(stored) == 2 + 2 * len(assocs)
    for path in series[: 2 + 2 * len(assocs)]:
        sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert sop in stored
        assert dataset_part(node.root / STUDY / SERIES / f"{sop}.dcm") == dataset_part(path)


def test_resent_instance_replaces_copy_and_is_reported_again(
    make_node: Callable[..., Node], series: list[Path]
) -> None:
    """Sending an instance twice keeps one file (replaced) and reports it to the sink twice."""
    node = make_node()
    storescu(node.port, series[:1])
    storescu(node.port, series[:1])
    files = node.spool_files()
    assert len(files) == 1
    assert dataset_part(files[0]) == dataset_part(series[0])
    assert [i.sop_instance_uid for i in node.sink.instances] == [
        node.sink.instances[0].sop_instance_uid
    ] * 2


@pytest.mark.parametrize(
    ("tool", "tool_args", "propose", "syntax"),
    [
        ("dcmcjpls", [], "-xt", "1.2.840.10008.1.2.4.80"),
        ("dcmcrle", [], "-xr", "1.2.840.10008.1.2.5"),
    ],
)
def test_compressed_syntax_is_stored_as_sent(
    make_node: Callable[..., Node],
    series: list[Path],
    tmp_path: Path,
    tool: str,
    tool_args: list[str],
    propose: str,
    syntax: str,
) -> None:
    """A JPEG-LS / RLE instance is stored in its own transfer syntax with identical bytes."""
    require_tool(tool)
    compressed = tmp_path / f"{tool}.dcm"
    procs.run_tool([tool, *tool_args, str(series[0]), str(compressed)], check=True)
    assert dcmread(compressed, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    node = make_node()
    out = storescu(node.port, [compressed], propose)
    assert "Store Failed" not in out, out
    [instance] = node.sink.instances
    assert instance.transfer_syntax_uid == syntax
    assert dcmread(instance.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert dataset_part(instance.path) == dataset_part(compressed)


def test_garbage_dataset_is_cannot_understand_and_node_keeps_serving(
    make_node: Callable[..., Node], series: list[Path], tmp_path: Path
) -> None:
    """An undecodable dataset gets 0xC210; the same listener then stores a good instance."""
    node = make_node()
    good = series[0]
    data = good.read_bytes()
    meta_end = len(data) - len(dataset_part(good))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[:meta_end] + b"\xff\xfe\x00\x01this is not a DICOM data set" * 40)
    with pytest.raises(PermanentError, match=r"0xC210 \(error: cannot understand\)"):
        send_instances(node.destination(), [garbage], calling_ae_title="TESTSCU")
    assert node.sink.instances == []
    report = send_instances(node.destination(), [good], calling_ae_title="TESTSCU")
    assert report.sent == 1
    assert len(node.sink.instances) == 1


def _variant(src: Path, out: Path, **changes: str) -> Path:
    ds = dcmread(src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize(
    ("changes", "event"),
    [
        ({"StudyInstanceUID": "1.2.3/../../../tmp/evil"}, "StudyInstanceUID"),
        ({"SeriesInstanceUID": "1.2." + "3" * 70}, "SeriesInstanceUID"),
    ],
)
def test_invalid_uids_are_refused_and_never_become_paths(
    make_node: Callable[..., Node],
    series: list[Path],
    tmp_path: Path,
    changes: dict[str, str],
    event: str,
) -> None:
    """A UID holding ``../`` or longer than 64 characters gets 0xA900 and writes nothing."""
    node = make_node()
    bad = _variant(series[0], tmp_path / "bad.dcm", **changes)
    out = storescu(node.port, [bad])
    assert "error: datasetdoesnotmatchsopclass" in out.lower(), out
    assert node.sink.instances == []
    assert node.spool_files() == []
    assert not (tmp_path / "evil").exists()


def test_sop_class_mismatch_is_refused(
    make_node: Callable[..., Node], series: list[Path], tmp_path: Path
) -> None:
    """A dataset whose SOP Class UID differs from the negotiated one gets 0xA900, with an Error
    Comment that says why (the sender puts it in its error)."""
    node = make_node()
    ds = dcmread(series[0])
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, dataset says CT
    mismatched = tmp_path / "mismatch.dcm"
    ds.save_as(mismatched, enforce_file_format=False)  # True would re-derive the meta
    assert dcmread(mismatched).file_meta.MediaStorageSOPClassUID != ds.SOPClassUID
    with pytest.raises(PermanentError, match=r"0xA900.*refused: sop class mismatch"):
        send_instances(node.destination(), [mismatched], calling_ae_title="TESTSCU")
    assert node.sink.instances == []


def test_unknown_calling_ae_is_rejected(make_node: Callable[..., Node]) -> None:
    """A calling AE title not in the allow-list is rejected permanently (reason 3)."""
    require_tool("echoscu")
    node = make_node(allowed_calling_ae_titles=["PACS"])
    evil = procs.run_tool(
        ["echoscu", "-aet", "EVIL", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)]
    )
    text = (evil.stdout + evil.stderr).lower()
    assert evil.returncode != 0
    assert "association rejected" in text
    assert "rejected permanent" in text and "calling ae title not recognized" in text
    ok = procs.run_tool(
        ["echoscu", "-aet", "PACS", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)]
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_wrong_called_ae_is_rejected(make_node: Callable[..., Node]) -> None:
    """A called AE title other than ours is rejected (reason 7) when it is required."""
    require_tool("echoscu")
    node = make_node()
    res = procs.run_tool(["echoscu", "-aec", "SOMEONE_ELSE", "127.0.0.1", str(node.port)])
    text = (res.stdout + res.stderr).lower()
    assert res.returncode != 0
    assert "called ae title not recognized" in text


def test_low_disk_answers_out_of_resources_without_writing(
    make_node: Callable[..., Node], series: list[Path]
) -> None:
    """Below the free-space watermark C-STORE gets 0xA700 and nothing is written."""
    node = make_node(min_free_mb=10**9)
    out = storescu(node.port, series[:2])
    assert "outofresources" in out.lower(), out
    assert node.sink.instances == []
    assert node.spool_files() == []
    with pytest.raises(TransientError, match=r"0xA700 \(refused: out of resources\)"):
        send_instances(node.destination(), series[:1], calling_ae_title="TESTSCU")


def test_association_end_reports_series(make_node: Callable[..., Node], series: list[Path]) -> None:
    """On release the sink gets one summary with the calling AE and the series received."""
    node = make_node()
    storescu(node.port, series)
    node.wait_associations(1)
    [summary] = node.sink.associations
    assert summary.released is True
    assert summary.calling_ae_title == "STORESCU"
    assert summary.series_instance_uids == frozenset({SERIES})
    assert summary.association_id == node.sink.instances[0].association_id


def test_aborted_association_is_reported_not_released(
    make_node: Callable[..., Node], series: list[Path]
) -> None:
    """An association the sender aborts is reported with ``released=False``."""
    node = make_node()
    storescu(node.port, series[:2], "--abort")
    node.wait_associations(1)
    [summary] = node.sink.associations
    assert summary.released is False
    assert summary.series_instance_uids == frozenset({SERIES})


def test_stop_frees_the_port(tmp_path: Path) -> None:
    """After ``stop`` the port can be bound again (a restarted node can listen)."""
    storage = StorageSettings(root=tmp_path / "spool", min_free_mb=0)
    settings = ListenerSettings(port=procs.free_port())
    first = Listener(settings, Spool(storage.root), CollectingSink(), storage)
    first.start()
    first.stop()
    second = Listener(settings, Spool(storage.root), CollectingSink(), storage)
    second.start()
    try:
        assert second.port == settings.port
    finally:
        second.stop()
    shutil.rmtree(tmp_path / "spool")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for ``localhost`` made with the openssl CLI."""
    require_tool("openssl")
    out = tmp_path_factory.mktemp("tls")
    cert, key = out / "cert.pem", out / "key.pem"
    procs.run_tool(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
    )
    return cert, key


def test_tls_listener_echoes_and_refuses_plain_tcp(
    make_node: Callable[..., Node], tls_files: tuple[Path, Path]
) -> None:
    """With TLS set, a TLS client gets C-ECHO success; a plain-TCP echoscu fails, node unharmed."""
    import ssl

    from dicom_node._compat.pynetdicom import TunedAE
    from dicom_node.settings import TlsSettings

    cert, key = tls_files
    node = make_node(tls=TlsSettings(certificate=cert, private_key=key))
    plain = procs.run_tool(
        ["echoscu", "-to", "5", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)], timeout=30
    )
    assert plain.returncode != 0
    client = ssl.create_default_context(cafile=str(cert))
    ae = TunedAE(ae_title="TLSSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="DICOM_NODE", tls_args=(client, "localhost")
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
