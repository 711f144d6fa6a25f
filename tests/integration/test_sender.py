"""The C-STORE SCU against real DCMTK storescp (and a real pynetdicom SCP for warnings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.delivery.dicom import SendReport, echo, send_instances
from dicom_node.demo import (
    ChestSpec,
    SeriesInfo,
    make_chest_phantom,
    slice_datasets,
    write_datasets,
)
from dicom_node.errors import PermanentError, TransientError
from dicom_node.settings import DestinationSettings
from tests.conftest import require_tool
from tests.support import procs

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.88"
SERIES = "1.2.826.0.1.3680043.8.498.88.1"


def dataset_part(path: Path) -> bytes:
    """The bytes after the File Meta Information group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six small phantom CT slices (Explicit VR Little Endian)."""
    phantom = make_chest_phantom(ChestSpec(rows=64, columns=64, slices=6))
    datasets = slice_datasets(
        phantom.hu, phantom.affine, SeriesInfo(study_uid=STUDY, series_uid=SERIES)
    )
    return sorted(write_datasets(datasets, tmp_path_factory.mktemp("series")))


@pytest.fixture
def bit_preserving_archive(tmp_path: Path) -> Iterator[procs.Server]:
    """storescp writing files exactly as received (+B), so datasets can be compared bytewise."""
    require_tool("storescp")
    server = procs.start_storescp(tmp_path / "bp", extra_args=["+B"], nodelay=False)
    try:
        yield server
    finally:
        server.stop()


def dest_for(server: procs.Server, ae_title: str = "ARCHIVE") -> DestinationSettings:
    return DestinationSettings(
        name="archive", ae_title=ae_title, host="127.0.0.1", port=server.port
    )


def received(server: procs.Server) -> list[Path]:
    return sorted(Path(server.extra["received"]).iterdir())


def test_series_reaches_archive(storescp_archive: procs.Server, series: list[Path]) -> None:
    """Every file is stored at the archive with status success and the same SOP instance UIDs."""
    report = send_instances(dest_for(storescp_archive), series, calling_ae_title="DICOM_NODE")
    assert isinstance(report, SendReport)
    assert report.sent == len(series) and report.warnings == []
    assert all(r.status == 0 for r in report.results)
    got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received(storescp_archive)}
    assert got == {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series}


def test_datasets_arrive_byte_identical(
    bit_preserving_archive: procs.Server, series: list[Path]
) -> None:
    """The dataset bytes the archive receives are exactly the stored ones (no re-encoding)."""
    send_instances(dest_for(bit_preserving_archive), series, calling_ae_title="DICOM_NODE")
    out = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
        for p in received(bit_preserving_archive)
    }
    for src in series:
        sop = dcmread(src, stop_before_pixels=True).SOPInstanceUID
        assert dataset_part(out[sop]) == dataset_part(src)


def test_compressed_file_is_sent_in_its_own_syntax(
    bit_preserving_archive: procs.Server, tmp_path: Path
) -> None:
    """An RLE Lossless file is proposed and sent as RLE, byte for byte."""
    phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=1))
    [path] = write_datasets(
        slice_datasets(phantom.hu, phantom.affine, SeriesInfo(study_uid=STUDY, series_uid=SERIES)),
        tmp_path,
        transfer_syntax=RLELossless,
    )
    send_instances(dest_for(bit_preserving_archive), [path], calling_ae_title="DICOM_NODE")
    [got] = received(bit_preserving_archive)
    assert dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    assert dataset_part(got) == dataset_part(path)


def test_connection_refused_is_transient(series: list[Path]) -> None:
    """Nobody listening on the port: TransientError naming the archive and the reason."""
    port = procs.free_port()
    dest = DestinationSettings(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=port)
    with pytest.raises(
        TransientError, match=rf"archive ARCHIVE@127.0.0.1:{port} unreachable: connection refused"
    ):
        send_instances(dest, series, calling_ae_title="DICOM_NODE")


def test_rejected_association_is_transient(tmp_path: Path, series: list[Path]) -> None:
    """An archive refusing the association raises TransientError with the reject reason."""
    require_tool("storescp")
    server = procs.start_storescp(tmp_path / "refusing", extra_args=["--refuse"])
    try:
        with pytest.raises(TransientError, match=r"rejected the association \(rejected "):
            send_instances(dest_for(server), series, calling_ae_title="DICOM_NODE")
    finally:
        server.stop()


def test_unacceptable_transfer_syntax_is_permanent(tmp_path: Path) -> None:
    """If the archive accepts neither the stored syntax nor a conversion, the error is permanent."""
    require_tool("storescp")
    # Without +xa storescp accepts uncompressed syntaxes only.
    phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=1))
    [path] = write_datasets(
        slice_datasets(phantom.hu, phantom.affine, SeriesInfo(study_uid=STUDY, series_uid=SERIES)),
        tmp_path / "src",
        transfer_syntax=RLELossless,
    )
    out = tmp_path / "plain" / "received"
    out.mkdir(parents=True)
    port = procs.free_port()
    proc, _ = procs._spawn(
        ["storescp", "--aetitle", "ARCHIVE", "--output-directory", str(out), str(port)],
        tmp_path / "plain",
        "storescp.log",
    )
    server = procs.Server(proc, port, tmp_path / "plain", tmp_path / "plain" / "storescp.log")
    try:
        procs.wait_for_port(port, proc=proc)
        with pytest.raises(PermanentError, match=r"accepts neither RLE Lossless"):
            send_instances(dest_for(server), [path], calling_ae_title="DICOM_NODE")
    finally:
        server.stop()


@pytest.fixture
def status_scp() -> Iterator[tuple[DestinationSettings, list[int]]]:
    """A real pynetdicom Storage SCP answering the statuses queued in the returned list."""
    answers: list[int] = []

    def handle(event: evt.Event) -> int:
        return answers.pop(0) if answers else 0

    ae = AE(ae_title="STATUS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = procs.free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    try:
        yield (
            DestinationSettings(name="status", ae_title="STATUS", host="127.0.0.1", port=port),
            answers,
        )
    finally:
        server.shutdown()


def test_warning_status_counts_as_sent(
    status_scp: tuple[DestinationSettings, list[int]], series: list[Path]
) -> None:
    """0xB000 (coercion of data elements) is success with the warning recorded."""
    dest, answers = status_scp
    answers.extend([0x0000, 0xB000])
    report = send_instances(dest, series[:3], calling_ae_title="DICOM_NODE")
    assert report.sent == 3
    [warned] = report.warnings
    assert warned.status == 0xB000 and warned.path == series[1]
    assert "coercion" in (warned.warning or "")


def test_out_of_resources_is_transient(
    status_scp: tuple[DestinationSettings, list[int]], series: list[Path]
) -> None:
    """0xA702 (out of resources) raises TransientError naming the status and SOP instance."""
    dest, answers = status_scp
    answers.append(0xA702)
    sop = dcmread(series[0], stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(
        TransientError, match=rf"0xA702 \(refused: out of resources\) for SOP instance {sop}"
    ):
        send_instances(dest, series[:2], calling_ae_title="DICOM_NODE")


@pytest.mark.parametrize("status", [0xA900, 0xC000, 0x0122])
def test_failure_status_is_permanent(
    status_scp: tuple[DestinationSettings, list[int]], series: list[Path], status: int
) -> None:
    """Any other failure status raises PermanentError naming the status and SOP instance."""
    dest, answers = status_scp
    answers.append(status)
    sop = dcmread(series[0], stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(PermanentError, match=rf"0x{status:04X}.* for SOP instance {sop}"):
        send_instances(dest, series[:1], calling_ae_title="DICOM_NODE")


def test_echo(storescp_archive: procs.Server) -> None:
    """C-ECHO is True for a running archive and False for a closed port."""
    assert echo(dest_for(storescp_archive)) is True
    closed = DestinationSettings(
        name="x", ae_title="ARCHIVE", host="127.0.0.1", port=procs.free_port()
    )
    assert echo(closed) is False


def test_empty_path_list_sends_nothing(storescp_archive: procs.Server) -> None:
    """No files: no association, an empty report."""
    assert send_instances(dest_for(storescp_archive), [], calling_ae_title="DICOM_NODE").sent == 0
