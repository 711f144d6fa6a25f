"""Pixel data -> the float32 volume: where each instance's pixel data are, how they are stored,
and decoding straight into the volume's slices in a thread pool (compressed lossless frames by
imagecodecs, which releases the GIL; everything else by pydicom), with the bits above
BitsStored ignored, MONOCHROME1 inverted within the stored range and the per-image rescale
applied.  :mod:`dicom_node.imaging.loading` decides which slice each frame fills."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.imaging.errors import SeriesError
from dicom_node.imaging.planes import Plane
from dicom_node.logs import scrub_text

# Exceptions pydicom and its decoder plugins raise on a corrupt or truncated file; a file is
# untrusted input, so each is turned into a SeriesError naming the file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, NotImplementedError, RuntimeError, OverflowError,
)
# Corrupt encapsulated pixel data also fails in pydicom's fragment parser or in a codec.
DECODE_ERRORS: tuple[type[BaseException], ...] = (*READ_ERRORS, struct.error, BytesLengthException)
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LITTLE_ENDIAN_NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Threads filling the volume; the decoders used for the common syntaxes and NumPy release the
#: GIL, so frames decode and rescale in parallel.
DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class PixelLayout:
    """How one instance stores its pixels, read from its header before any decoding starts
    (decoding threads then never touch the dataset)."""

    sop_instance_uid: str
    file_name: str
    syntax: str
    #: Native-order dtype of the stored values (PixelRepresentation, BitsAllocated); None
    #: unless 8 or 16 bits allocated with 0 < BitsStored <= BitsAllocated.
    dtype: np.dtype[Any] | None
    signed: bool
    bits_stored: int
    photometric: str

    @property
    def monochrome1(self) -> bool:
        return self.photometric == "MONOCHROME1"

    def cannot_decode(self, exc: BaseException) -> SeriesError:
        return SeriesError(f"cannot decode the pixel data of image {self.sop_instance_uid} "
                           f"(file {self.file_name}): {scrub_text(str(exc))}")


def pixel_layout(ds: Dataset, path: Path) -> PixelLayout:
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    regular = allocated in (8, 16) and 0 < stored <= allocated
    return PixelLayout(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        file_name=path.name,
        syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        dtype=np.dtype(f"{'i' if signed else 'u'}{allocated // 8}") if regular else None,
        signed=signed,
        bits_stored=stored,
        photometric=str(ds.get("PhotometricInterpretation", "")),
    )


def _decode_jpeg_ls(data: bytes, pixels: PixelLayout, shape: tuple[int, int]) -> np.ndarray:
    return imagecodecs.jpegls_decode(data)


def _decode_jpeg_lossless(data: bytes, pixels: PixelLayout, shape: tuple[int, int]) -> np.ndarray:
    # libjpeg-turbo: also right where pylibjpeg-libjpeg gets a point transform wrong.
    return imagecodecs.jpeg8_decode(data)


def _decode_jpeg_2000(data: bytes, pixels: PixelLayout, shape: tuple[int, int]) -> np.ndarray:
    return imagecodecs.jpeg2k_decode(data, numthreads=1)  # frames are already decoded in parallel


def _decode_rle(data: bytes, pixels: PixelLayout, shape: tuple[int, int]) -> np.ndarray:
    assert pixels.dtype is not None  # only called for 8 or 16 bits allocated
    _check_rle_header(data, pixels.dtype.itemsize)
    return np.frombuffer(imagecodecs.dicomrle_decode(data, pixels.dtype),
                         dtype=pixels.dtype).reshape(shape)


def _check_rle_header(data: bytes, segments: int) -> None:
    """Refuse an RLE header whose segment count or offsets do not fit the frame: imagecodecs
    (2026.3) trusts the offsets and crashes the process on ones past the end (found by fuzzing)."""
    if len(data) < 64:
        raise ValueError(f"the RLE frame has {len(data)} bytes, less than its 64-byte header")
    count, *offsets = struct.unpack("<16L", data[:64])
    if count != segments:
        raise ValueError(f"the RLE header lists {count} segments, {segments} expected")
    bounds = [*offsets[:count], len(data)]
    if bounds[0] != 64 or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"the RLE segment offsets {offsets[:count]} do not lie in order inside "
                         f"the {len(data)}-byte frame")


#: Lossless (and JPEG-LS near-lossless, which decodes exactly) syntaxes decoded one frame at a
#: time by imagecodecs, which releases the GIL: frames decode in parallel threads.  Each
#: decoder returns the frame's stored bit patterns; :func:`_stored_values` interprets them.
#: Other syntaxes (lossy JPEG and JPEG 2000, big endian, deflate) go through pydicom.
_GIL_FREE_DECODERS: dict[str, Callable[[bytes, PixelLayout, tuple[int, int]], np.ndarray]] = {
    JPEGLSLossless: _decode_jpeg_ls,
    JPEGLSNearLossless: _decode_jpeg_ls,
    JPEGLossless: _decode_jpeg_lossless,
    JPEGLosslessSV1: _decode_jpeg_lossless,
    JPEG2000Lossless: _decode_jpeg_2000,
    RLELossless: _decode_rle,
}


def fill(out: np.ndarray, jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` (each writes its own slices of ``out``); the first failure in job order
    is raised, as a serial run would raise it, and the jobs not yet started are cancelled."""
    workers = min(DECODE_THREADS, len(jobs))
    if workers <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()


def decode_jobs(
    out: np.ndarray,
    ds: Dataset,
    pixels: PixelLayout,
    location: tuple[int, int | None] | None,
    path: Path,
    slices: list[tuple[int, Plane]],
) -> list[Callable[[], None]]:
    """Work that fills the ``slices`` (volume index, plane) of ``out`` from one file.  What the
    threads need from the header is gathered here: they never touch a dataset."""
    if location is None:
        return [partial(_decode_instance, out, ds, pixels, slices)]
    offset, length = location
    rows, columns = int(ds.Rows), int(ds.Columns)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.syntax in _LITTLE_ENDIAN_NATIVE:
        return [partial(_read_native, out, path, offset, length, (count, rows, columns), pixels, slices)]
    decoder = _GIL_FREE_DECODERS[pixels.syntax]
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    if count == 1:
        ((k, plane),) = slices  # a single-frame instance is one slice
        return [partial(_read_and_decode_frame, out[k], path, offset, offsets, decoder, pixels, plane)]
    # A multi-frame instance is split here so that its frames decode in parallel.
    frames = _encoded_frames(_read_from(path, offset, pixels), count, offsets, pixels)
    return [partial(_decode_frame, out[k], decoder, frames[plane.frame - 1], pixels, plane)
            for k, plane in slices]


def _read_from(path: Path, offset: int, pixels: PixelLayout, size: int = -1) -> bytes:
    """``size`` bytes (all, if -1) of ``path`` from ``offset``."""
    try:
        with path.open("rb") as fp:
            fp.seek(offset)
            return fp.read(size)
    except OSError as exc:
        raise pixels.cannot_decode(exc) from exc


def _read_native(
    out: np.ndarray,
    path: Path,
    offset: int,
    length: int | None,
    shape: tuple[int, int, int],
    pixels: PixelLayout,
    slices: list[tuple[int, Plane]],
) -> None:
    assert pixels.dtype is not None  # native data are located only with 8 or 16 bits allocated
    count, rows, columns = shape
    expected = count * rows * columns * pixels.dtype.itemsize
    data = _read_from(path, offset, pixels, expected)
    if len(data) < expected or (length is not None and length < expected):
        held = len(data) if length is None else min(len(data), length)
        raise pixels.cannot_decode(ValueError(
            f"Pixel Data holds {held} bytes, {count} frame(s) of {rows}x{columns} need {expected}"
            + (" (the file ends there: it is truncated)" if len(data) < expected else "")))
    frames = np.frombuffer(data, dtype=pixels.dtype.newbyteorder("<"))
    _store_frames(out, frames.reshape((count, rows, columns) if count > 1 else (rows, columns)),
                  pixels, slices)


def _encoded_frames(
    data: bytes, count: int, offsets: tuple[bytes, bytes] | None, pixels: PixelLayout
) -> list[bytes]:
    """The encoded bytes of each of the ``count`` frames of encapsulated pixel data."""
    try:
        frames = list(itertools.islice(
            generate_frames(data, number_of_frames=count, extended_offsets=offsets), count))
    except DECODE_ERRORS as exc:
        raise pixels.cannot_decode(exc) from exc
    if len(frames) < count:
        raise pixels.cannot_decode(ValueError(f"{len(frames)} of {count} frames found in the "
                                              "encapsulated pixel data"))
    return frames


def _read_and_decode_frame(
    out: np.ndarray,
    path: Path,
    offset: int,
    offsets: tuple[bytes, bytes] | None,
    decoder: Callable[[bytes, PixelLayout, tuple[int, int]], np.ndarray],
    pixels: PixelLayout,
    plane: Plane,
) -> None:
    (frame,) = _encoded_frames(_read_from(path, offset, pixels), 1, offsets, pixels)
    _decode_frame(out, decoder, frame, pixels, plane)


def _decode_frame(
    out: np.ndarray,
    decoder: Callable[[bytes, PixelLayout, tuple[int, int]], np.ndarray],
    data: bytes,
    pixels: PixelLayout,
    plane: Plane,
) -> None:
    try:
        frame = decoder(data, pixels, (plane.rows, plane.columns))
    except DECODE_ERRORS as exc:
        raise pixels.cannot_decode(exc) from exc
    _store(out, frame, pixels, plane)


def _decode_instance(
    out: np.ndarray, ds: Dataset, pixels: PixelLayout, slices: list[tuple[int, Plane]]
) -> None:
    """Decode a whole instance with pydicom (holds the GIL: one instance at a time)."""
    try:
        frames = np.asarray(pixel_array(ds))
    except DECODE_ERRORS as exc:
        raise pixels.cannot_decode(exc) from exc
    _store_frames(out, frames, pixels, slices)


def _store_frames(
    out: np.ndarray, frames: np.ndarray, pixels: PixelLayout, slices: list[tuple[int, Plane]]
) -> None:
    for k, plane in slices:
        _store(out[k], frames[plane.frame - 1] if frames.ndim == 3 else frames, pixels, plane)


def _store(out: np.ndarray, frame: np.ndarray, pixels: PixelLayout, plane: Plane) -> None:
    """Write one frame's rescaled values into its slice ``out`` of the volume."""
    if frame.shape != (plane.rows, plane.columns):
        raise SeriesError(f"frame {plane.frame} of image {plane.sop_instance_uid} has "
                          f"shape {frame.shape}, expected {plane.rows}x{plane.columns}")
    frame = _stored_values(frame, pixels)
    if pixels.monochrome1:
        frame = _invert_monochrome1(frame, pixels)
    _rescale_into(out, frame, plane.slope, plane.intercept)


def _stored_values(frame: np.ndarray, pixels: PixelLayout) -> np.ndarray:
    """The stored values of ``frame``: its bit patterns read with the instance's dtype, with
    the bits above BitsStored ignored (old scanners kept overlays there) and the sign taken
    from the stored high bit.  Decoders do not agree on these (JPEG-LS and JPEG lossless carry
    no sign; pydicom leaves JPEG-LS high bits as they were), so it is done here for all."""
    dtype = pixels.dtype
    if dtype is None or frame.dtype.kind not in "iu":
        return frame
    if not frame.dtype.isnative:
        frame = frame.astype(frame.dtype.newbyteorder("="))
    if frame.dtype != dtype:
        frame = frame.view(dtype) if frame.dtype.itemsize == dtype.itemsize else frame.astype(dtype)
    shift = 8 * dtype.itemsize - pixels.bits_stored
    if shift == 0:
        return frame
    if pixels.signed:
        return np.asarray((frame << shift) >> shift)
    return np.asarray(frame & dtype.type((1 << pixels.bits_stored) - 1))


def _rescale_into(out: np.ndarray, frame: np.ndarray, slope: float, intercept: float) -> None:
    """``out = frame * slope + intercept`` in float32, in as few passes as the values allow."""
    if slope == 1.0:
        np.add(frame, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
        return
    np.multiply(frame, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)


def _invert_monochrome1(frame: np.ndarray, pixels: PixelLayout) -> np.ndarray:
    """Mirror stored values within the stored range so that larger means brighter."""
    wide = frame.astype(np.int32 if frame.dtype.itemsize <= 2 else np.int64)
    if pixels.signed:
        # Signed range [-2^(b-1), 2^(b-1)-1] maps onto itself by v -> -1 - v.
        return np.asarray(-1 - wide)
    return np.asarray((1 << (pixels.bits_stored or 16)) - 1 - wide)


def pixel_data_location(pixels: PixelLayout, start: int, head: bytes) -> tuple[int, int | None] | None:
    """(offset, length) of the Pixel Data value whose element starts at ``start`` with
    ``head``, when a decoding thread can read and decode it without pydicom."""
    native = pixels.syntax in _LITTLE_ENDIAN_NATIVE
    if (pixels.dtype is None or not (native or pixels.syntax in _GIL_FREE_DECODERS)
            or head[:4] != _PIXEL_DATA_TAG):
        return None
    if pixels.syntax == ImplicitVRLittleEndian:
        header, length = 8, int.from_bytes(head[4:8], "little")
    elif len(head) == 12 and head[4:6] in (b"OB", b"OW"):
        header, length = 12, int.from_bytes(head[8:12], "little")
    else:
        return None
    if native:
        return (start + header, length) if length != _UNDEFINED_LENGTH else None
    if length != _UNDEFINED_LENGTH or pixels.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    return (start + header, None)
