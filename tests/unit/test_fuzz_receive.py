"""Fuzzing the receive-and-load path: mutated bytes of a valid instance never raise anything but
the package's own errors (which the listener turns into a status and the worker into a reason)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from dicom_node.errors import DicomNodeError
from dicom_node.imaging.loading import load_series
from dicom_node.ingest.header import UndecodableDatasetError, parse_header

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _valid(tmp: Path) -> list[Path]:
    phantom = make_chest_phantom(ChestSpec(rows=16, columns=16, slices=3))
    return write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="fuzz")), tmp)


_SERIES = _valid(Path(tempfile.mkdtemp(prefix="fuzz-")))
_FILE = _SERIES[0].read_bytes()
_META_END = 144 + int.from_bytes(_FILE[140:144], "little")
_BODY = _FILE[_META_END:]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with bytes overwritten, inserted or cut (most mutations land in the header)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate", "length"]))
        at = draw(st.integers(0, max(0, min(len(out) - 1, 600))))
        if kind == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del out[at:]
        elif kind == "length" and len(out) >= at + 4:
            # Declared lengths are where parsers go wrong: make one huge or odd.
            out[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\xfe\xff\xff\x7f", b"\x01\x00\x00\x00"]))
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=mutated(_BODY), syntax=st.sampled_from([EXPLICIT_LE, IMPLICIT_LE, DEFLATED]))
def test_listener_parsing_raises_only_its_own_error(body: bytes, syntax: str) -> None:
    """The listener's header parser returns values or raises UndecodableDatasetError, whatever
    the bytes and the negotiated transfer syntax."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            uids, attributes = parse_header(body, syntax)
        except UndecodableDatasetError as exc:
            assert str(exc).startswith("the data set cannot be decoded as")
            return
    assert set(uids) == {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
    assert all(isinstance(v, str | int | float) for v in attributes.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(_FILE))
def test_load_series_raises_only_package_errors(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``load_series`` on a series holding one mutated file succeeds or raises a DicomNodeError."""
    path = tmp_path_factory.mktemp("m") / "mutated.dcm"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_series([path, *_SERIES[1:]])
        except DicomNodeError:
            pass
