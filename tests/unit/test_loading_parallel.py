"""load_series fills the volume from a thread pool: the same voxels and the same errors as one thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_node.demo import Phantom, write_datasets
from dicom_node.imaging import pixels
from dicom_node.imaging.loading import SeriesError, load_series
from tests.support import quirks

#: Thread counts compared: serial, and more threads than this machine has cores.
THREADS = (1, 4)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """12 slices of 32x32 at 10 mm, 5 mm apart."""
    return quirks.small_phantom()


def _stack(phantom: Phantom, seed: str) -> list[Dataset]:
    return quirks.stack(phantom.hu, phantom.affine, quirks.series_info(seed))


def _with_threads(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.setattr(pixels, "DECODE_THREADS", threads)


def _truncate_frame(ds: Dataset) -> None:
    """Keep only the first half of the (single) encoded frame of ``ds``."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])


def _mixed_syntaxes(phantom: Phantom, seed: str, *, monochrome1: bool = False) -> list[Dataset]:
    """Slices cycling through native, JPEG-LS, RLE and JPEG 2000 lossless, with per-slice rescale
    (or stored as MONOCHROME1)."""
    datasets = _stack(phantom, seed)
    datasets = quirks.monochrome1(datasets) if monochrome1 else quirks.per_slice_rescale(datasets)
    syntaxes = (None, JPEGLSLossless, RLELossless, JPEG2000Lossless)
    for k, ds in enumerate(datasets):
        syntax = syntaxes[k % len(syntaxes)]
        if syntax is not None:
            ds.compress(UID(syntax))
    return datasets


@pytest.mark.parametrize("threads", THREADS)
def test_mixed_syntaxes_exact_with_any_thread_count(
    phantom: Phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """A series mixing native and compressed slices with per-slice rescale loads exactly."""
    _with_threads(monkeypatch, threads)
    paths = write_datasets(_mixed_syntaxes(phantom, "mixed"), tmp_path)
    loaded = load_series(paths)
    assert len({str(ds.file_meta.TransferSyntaxUID) for ds in loaded.sources}) == 4
    np.testing.assert_array_equal(loaded.volume.array, 2.0 * np.round(quirks.stored_hu(phantom.hu) / 2.0))


def test_threads_give_the_voxels_of_one_thread(
    phantom: Phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread pool and the serial path produce identical volumes and frame references."""
    paths = write_datasets(_mixed_syntaxes(phantom, "same", monochrome1=True), tmp_path)
    results = []
    for threads in THREADS:
        _with_threads(monkeypatch, threads)
        results.append(load_series(paths))
    serial, pooled = results
    np.testing.assert_array_equal(pooled.volume.array, serial.volume.array)
    np.testing.assert_array_equal(pooled.volume.array, quirks.stored_hu(phantom.hu))
    assert pooled.frame_refs == serial.frame_refs
    assert pooled.volume.metadata == serial.volume.metadata
    assert pooled.volume.metadata["photometric"] == "MONOCHROME1 inverted"


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless, JPEG2000Lossless])
def test_corrupt_frame_refused_naming_image_and_file(
    phantom: Phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int, syntax: str
) -> None:
    """A cut encoded frame is refused with a SeriesError naming its SOP instance and file."""
    _with_threads(monkeypatch, threads)
    datasets = quirks.compress(_stack(phantom, "corrupt"), UID(syntax))
    _truncate_frame(datasets[5])
    paths = write_datasets(datasets, tmp_path)
    sop = datasets[5].SOPInstanceUID
    name = next(p.name for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == sop)
    with pytest.raises(SeriesError, match=rf"cannot decode the pixel data of image {sop} \(file {name}\): "):
        load_series(paths)


def test_first_corrupt_slice_reported_whatever_the_thread_count(
    phantom: Phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two corrupt slices the error names the first one along the volume, as serially."""
    datasets = quirks.compress(_stack(phantom, "two-bad"), UID(JPEGLSLossless))
    for k in (9, 3):
        _truncate_frame(datasets[k])
    paths = write_datasets(quirks.shuffle_instance_numbers(datasets, seed=2), tmp_path)
    messages = []
    for threads in THREADS:
        _with_threads(monkeypatch, threads)
        with pytest.raises(SeriesError, match=r"cannot decode the pixel data") as info:
            load_series(paths)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    first = min((datasets[3], datasets[9]), key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert str(first.SOPInstanceUID) in messages[0]


def test_encapsulated_data_without_a_frame_refused(phantom: Phantom, tmp_path: Path) -> None:
    """Encapsulated pixel data whose offset table is cut is refused naming the image."""
    datasets = quirks.compress(_stack(phantom, "no-frame"), UID(RLELossless))
    datasets[2].PixelData = encapsulate([b"\x00" * 64])[:10]
    with pytest.raises(SeriesError, match=rf"cannot decode the pixel data of image {datasets[2].SOPInstanceUID} "):
        load_series(write_datasets(datasets, tmp_path))


@pytest.mark.parametrize(("field", "value", "message"), [
    (0, 3, r"the RLE header lists 3 segments, 2 expected"),
    (2, 0x7FFF0000, r"the RLE segment offsets \[64, 2147418112\] do not lie in order"),
])
def test_rle_header_not_fitting_its_frame_refused(
    phantom: Phantom, tmp_path: Path, field: int, value: int, message: str
) -> None:
    """An RLE frame whose header lists the wrong number of segments, or a segment past its end
    (which crashed the process inside imagecodecs), is refused naming the image."""
    datasets = quirks.compress(_stack(phantom, "rle-header"), UID(RLELossless))
    frame = bytearray(next(generate_frames(datasets[6].PixelData, number_of_frames=1)))
    frame[4 * field:4 * field + 4] = value.to_bytes(4, "little")
    datasets[6].PixelData = encapsulate([bytes(frame)])
    with pytest.raises(SeriesError, match=rf"image {datasets[6].SOPInstanceUID} .*: {message}"):
        load_series(write_datasets(datasets, tmp_path))
